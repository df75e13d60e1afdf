"""labfleet/datasets_s3.py and the s3: form of a dataset: settings, the rclone config, the dry run, the transfer."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from labfleet import compose, datasets, datasets_s3
from labfleet.facts.datasets import RcloneDryRun, parse_rclone_dry_run
from labfleet.model import Source
from labfleet.settings import SettingsError, build

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
CREDENTIALS = f"[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = {SECRET}\n"


@pytest.fixture
def keys(tmp_path) -> Path:
    path = tmp_path / "lab-s3.ini"
    path.write_text(CREDENTIALS)
    return path


def _s3(keys, **spec):
    return {
        "source": "s3:lab-data/imagenet/train",
        "s3_endpoint": "http://s3.lab:9000",
        "s3_credentials_file": str(keys),
        **spec,
    }


def test_an_s3_source_is_parsed_with_its_endpoint_and_credentials_file(raw, keys):
    raw["datasets"] = {"imagenet": _s3(keys, source="s3:lab-data/imagenet/train/", s3_endpoint="https://s3.lab:9000/")}
    (dataset,) = build("pc01", raw).datasets
    assert dataset.source == Source(
        "s3",
        "s3:lab-data/imagenet/train",
        path="imagenet/train",
        bucket="lab-data",
        endpoint="https://s3.lab:9000",
        credentials_file=str(keys.resolve()),
    )
    assert (dataset.readonly, dataset.prune) == (True, False)
    raw["datasets"] = {"all": _s3(keys, source="s3:lab.data-2026")}
    (whole,) = build("pc01", raw).datasets
    assert (whole.source.bucket, whole.source.path, str(whole.source)) == ("lab.data-2026", "", "s3:lab.data-2026")
    # The secret is read, never kept: nothing that could be printed holds it.
    assert SECRET not in repr(build("pc01", raw))


def _bad(raw, spec) -> str:
    raw["datasets"] = {"imagenet": spec}
    with pytest.raises(SettingsError) as err:
        build("pc07", raw)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"host pc07: datasets = {raw['datasets']!r} is invalid"), message
    assert "s3_endpoint, s3_credentials_file}" in message, "the expected form is missing"
    assert SECRET not in message
    return message


@pytest.mark.parametrize(
    ("source", "detail"),
    [
        ("s3:", "bucket '' is not an S3 bucket name"),
        ("s3:/train", "bucket '' is not an S3 bucket name"),
        ("s3:Lab_Data/train", "bucket 'Lab_Data' is not an S3 bucket name (3 to 63 lowercase letters"),
        ("s3:ab", "bucket 'ab' is not an S3 bucket name"),
        ("s3:-lab/x", "bucket '-lab' is not an S3 bucket name"),
        ("s3:lab..data", "bucket 'lab..data' is not an S3 bucket name"),
        ("s3:lab-data/a/../b", "prefix 'a/../b' must not hold '//' or '..'"),
    ],
)
def test_a_malformed_s3_source_is_refused(raw, keys, source, detail):
    message = _bad(raw, _s3(keys, source=source))
    assert detail in message and "s3:<bucket>[/<prefix>]" in message, message


@pytest.mark.parametrize(
    "endpoint", ["s3.lab:9000", "ftp://s3.lab", "http://", "http://s3.lab:port", "https://s3 lab", 9000]
)
def test_an_endpoint_that_is_not_a_url_is_refused(raw, keys, endpoint):
    message = _bad(raw, _s3(keys, s3_endpoint=endpoint))
    assert f"s3_endpoint {endpoint!r} is not an http:// or https:// URL like https://s3.lab:9000" in message


@pytest.mark.parametrize(
    ("content", "detail"),
    [
        ("aws_access_key_id = AK\n", "has no [profile] line before its keys"),
        (
            "[a]\naws_access_key_id = AK\naws_secret_access_key = S\n[b]\n",
            "exactly one profile such as [default], not 2",
        ),
        ("", "exactly one profile such as [default], not 0"),
        ("[default]\naws_access_key_id = AK\n", "profile [default] has no aws_secret_access_key"),
        ("[default]\naws_secret_access_key = S\n", "profile [default] has no aws_access_key_id"),
        (
            f"[default]\naws_access_key_id = AK\naws_secret_access_key = {SECRET}\naws_session_token = T\n",
            "unknown keys ['aws_session_token']",
        ),
        (
            f"[default]\naws_access_key_id = AK\naws_secret_access_key = {SECRET}\n{SECRET}\n",
            "a line that is not 'key = value'",
        ),
        (
            f"[default]\naws_access_key_id = AK\naws_secret_access_key = {SECRET}\naws_access_key_id = B\n",
            "names a key or a profile twice",
        ),
        (f"[default]\naws_access_key_id = A K\naws_secret_access_key = {SECRET}\n", "aws_access_key_id holds spaces"),
    ],
)
def test_a_malformed_credentials_file_is_refused_without_quoting_it(raw, tmp_path, content, detail):
    bad = tmp_path / "keys.ini"
    bad.write_text(content)
    message = _bad(raw, _s3(bad))
    assert f"s3_credentials_file: {bad}" in message and detail in message, message
    assert "expected a file on the controller with one profile, e.g. [default] with aws_access_key_id" in message


def test_a_missing_credentials_file_is_refused(raw, tmp_path):
    message = _bad(raw, _s3(tmp_path / "nowhere.ini"))
    assert f"s3_credentials_file: '{tmp_path / 'nowhere.ini'}' is no such file on the controller" in message


@pytest.mark.parametrize(
    ("spec", "detail"),
    [
        ({"source": "s3:lab-data"}, "an s3: source needs s3_endpoint and s3_credentials_file"),
        ({"source": "s3:lab-data", "s3_endpoint": "http://s3.lab"}, "an s3: source needs s3_credentials_file"),
        (
            {"source": "manual", "s3_endpoint": "http://s3.lab"},
            "s3_endpoint belongs to an s3: source only, not to 'manual'",
        ),
        (
            {"source": "nfs:nas:/x", "s3_endpoint": "http://s3.lab", "s3_credentials_file": "/k"},
            "s3_endpoint and s3_credentials_file belong to an s3: source only, not to 'nfs:nas:/x'",
        ),
    ],
)
def test_s3_keys_belong_to_s3_sources_and_s3_sources_need_both(raw, spec, detail):
    assert detail in _bad(raw, spec)


def _dataset(raw, keys, **spec):
    raw["datasets"] = {"imagenet": _s3(keys, **spec)}
    return build("pc01", raw).datasets[0]


def test_the_hosts_rclone_config_holds_the_keys_and_the_endpoint(raw, keys):
    dataset = _dataset(raw, keys)
    config = datasets_s3.rclone_config(dataset.source)
    assert config.splitlines()[1:] == [
        "[bucket]",
        "type = s3",
        "provider = Other",
        "endpoint = http://s3.lab:9000",
        "access_key_id = AKIAIOSFODNN7EXAMPLE",
        f"secret_access_key = {SECRET}",
    ]
    keys.write_text(CREDENTIALS + "region = eu-west-1\n")
    aws = _dataset(raw, keys, s3_endpoint="https://s3.eu-west-1.amazonaws.com")
    assert {"provider = AWS", "region = eu-west-1"} <= set(datasets_s3.rclone_config(aws.source).splitlines())
    assert datasets_s3.remote(dataset.source) == "bucket:lab-data/imagenet/train"
    assert datasets_s3.config_path(dataset) == "/etc/labfleet/dataset-s3/imagenet.conf"
    assert datasets_s3.staging_dir("/srv/datasets", dataset) == "/srv/datasets/.labfleet-incoming/imagenet"


def test_an_s3_dataset_needs_rclone_and_sits_under_the_read_only_root(raw, keys):
    settings = build("pc01", {**raw, "datasets": {"imagenet": _s3(keys)}})
    assert datasets._packages(settings, serves_pulls=False) == ["acl", "rclone"]
    assert compose._dataset_mounts(settings) == [
        {"type": "bind", "source": "${DATASET_LOCALDIR}", "target": "${DATASET_DIR}", "read_only": True}
    ]


# What rclone 1.60 prints for a dry run (copy and sync) and for a bucket it cannot read.
DRY_RUN = """\
2026/12/02 12:15:51 NOTICE: d0/f2.bin: Skipped copy as --dry-run is set (size 7)
2026/12/02 12:15:51 NOTICE: big.bin: Skipped copy as --dry-run is set (size 64Mi)
2026/12/02 12:15:51 NOTICE: new dir/n.bin: Skipped copy as --dry-run is set (size 3)
2026/12/02 12:15:51 NOTICE: d0/f0.bin: Skipped update modification time as --dry-run is set (size 100)
2026/12/02 12:15:51 NOTICE: d1/f1.bin: Skipped delete as --dry-run is set (size 101)
2026/12/02 12:15:51 NOTICE:
Transferred:   	         10 B / 10 B, 100%, 0 B/s, ETA -
Checks:                 5 / 5, 100%
Elapsed time:         0.0s
labfleet-rc=0
"""
NO_BUCKET = """\
2026/12/02 12:20:01 ERROR : : error reading source root directory: directory not found
2026/12/02 12:20:01 ERROR : Attempt 3/3 failed with 1 errors and: directory not found
2026/12/02 12:20:01 Failed to copy: directory not found
labfleet-rc=3
"""


def test_the_dry_run_lists_copies_and_deletes_but_not_a_time_to_set():
    assert parse_rclone_dry_run(DRY_RUN.splitlines()) == {
        "rc": 0,
        "changes": ["d0/f2.bin", "big.bin", "new dir/n.bin", "d1/f1.bin"],
        "copies": ["d0/f2.bin", "big.bin", "new dir/n.bin"],
        "error": "",
    }
    assert parse_rclone_dry_run(NO_BUCKET.splitlines()) == {
        "rc": 3,
        "changes": [],
        "copies": [],
        "error": "Failed to copy: directory not found",
    }
    assert RcloneDryRun().command("rclone copy a b").startswith("rclone copy a b --dry-run 2>&1;")


def test_the_transfer_reads_the_same_copies_from_rclones_log_as_the_fact():
    listed = subprocess.run(
        ["sed", "-n", datasets_s3.SKIPPED_COPY_SED], input=DRY_RUN, capture_output=True, text=True, check=True
    )
    assert listed.stdout.splitlines() == ["d0/f2.bin", "big.bin", "new dir/n.bin"]


def _sync(dataset, dest="/srv/datasets/imagenet"):
    return list(
        datasets_s3.sync_bucket._inner(
            dataset=dataset,
            dest=dest,
            staging="/srv/datasets/.labfleet-incoming/imagenet",
            config="/etc/labfleet/dataset-s3/imagenet.conf",
            group="labdata",
            stamp="/var/lib/labfleet/datasets/imagenet.verified",
        )
    )


def test_nothing_to_copy_is_a_noop_and_an_unreadable_bucket_fails_the_host(raw, keys, fake_host_in):
    dataset = _dataset(raw, keys)
    fake = fake_host_in(datasets_s3, {RcloneDryRun: {"rc": 0, "changes": [], "error": ""}})
    assert _sync(dataset) == []
    assert fake.noops == ["/srv/datasets/imagenet already matches s3:lab-data/imagenet/train"]

    fake_host_in(datasets_s3, {RcloneDryRun: parse_rclone_dry_run(NO_BUCKET.splitlines())})
    (command,) = _sync(dataset)
    failed = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.splitlines() == [
        "labfleet: host pc01: dataset imagenet: rclone cannot read s3:lab-data/imagenet/train from "
        "http://s3.lab:9000 (rclone exit 3): Failed to copy: directory not found; check s3_endpoint, the "
        "bucket and prefix, and the keys in s3_credentials_file"
    ]


def test_the_transfer_fetches_into_staging_renames_into_place_and_deletes_only_with_prune(raw, keys, fake_host_in):
    fake_host_in(datasets_s3, {RcloneDryRun: parse_rclone_dry_run(DRY_RUN.splitlines())})
    (command,) = _sync(_dataset(raw, keys))
    assert SECRET not in command and "AKIAIOSFODNN7EXAMPLE" not in command
    # The fetch's list is the fact's copies (no second dry run), written where only root reads.
    assert command.count("--config /etc/labfleet/dataset-s3/imagenet.conf") == 1 and "--dry-run" not in command
    assert "printf '%s\\n' d0/f2.bin big.bin 'new dir/n.bin' > /srv/datasets/.labfleet-incoming/imagenet.list" in (
        command
    )
    assert (
        "sync bucket:lab-data/imagenet/train /srv/datasets/.labfleet-incoming/imagenet "
        "--files-from-raw /srv/datasets/.labfleet-incoming/imagenet.list --delete-excluded" in command
    )
    assert "chown root:labdata {} + -exec chmod u+rw,go+r,go-w {} +" in command
    assert (
        "find /srv/datasets/.labfleet-incoming/imagenet -type d | sh -c " in command
        and " sh /srv/datasets/imagenet /srv/datasets/.labfleet-incoming/imagenet" in command
    )
    assert "find /srv/datasets/.labfleet-incoming/imagenet -mindepth 1 -depth -type d -empty -delete" in command
    assert "rm -f /var/lib/labfleet/datasets/imagenet.verified" in command
    # Without prune, what is deleted is in staging only: files not listed, and emptied directories.
    rest = command.replace("--delete-excluded", "").replace("-type d -empty -delete", "")
    assert "delete" not in rest

    (pruned,) = _sync(_dataset(raw, keys, prune=True, readonly=False))
    assert "chmod ug+rw,o+r,o-w" in pruned
    assert "--one-way --size-only --missing-on-dst /srv/datasets/.labfleet-incoming/imagenet.gone" in pruned
    assert "delete /srv/datasets/imagenet --files-from-raw /srv/datasets/.labfleet-incoming/imagenet.gone" in pruned


def test_a_long_list_of_copies_is_listed_again_on_the_host(raw, keys, fake_host_in):
    many = [f"d{n // 1000}/f{n:06d}.bin" for n in range(8000)]
    fake_host_in(datasets_s3, {RcloneDryRun: {"rc": 0, "changes": many, "copies": many, "error": ""}})
    (command,) = _sync(_dataset(raw, keys))
    assert "f000001.bin" not in command and len(command) < 4096
    assert "copy bucket:lab-data/imagenet/train /srv/datasets/imagenet --dry-run" in command
    assert f'sed -n {shlex.quote(datasets_s3.SKIPPED_COPY_SED)} "$log" > ' in command


def test_a_failed_transfer_fails_the_host_with_rclones_last_error(raw, keys, fake_host_in, tmp_path):
    """The transfer's shell runs here against a stand-in rclone that fails like a lost endpoint."""
    fake_host_in(datasets_s3, {RcloneDryRun: parse_rclone_dry_run(DRY_RUN.splitlines())})
    dest, staging = tmp_path / "imagenet", tmp_path / "incoming" / "imagenet"
    dest.mkdir()
    (command,) = list(
        datasets_s3.sync_bucket._inner(
            dataset=_dataset(raw, keys),
            dest=str(dest),
            staging=str(staging),
            config=str(keys),
            group="labdata",
            stamp=str(tmp_path / "stamp"),
        )
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rclone").write_text(
        "#!/bin/sh\necho '2026/12/02 12:30:00 ERROR : d0/f2.bin: Failed to copy: connection refused' >&2\nexit 1\n"
    )
    (bin_dir / "rclone").chmod(0o755)
    # install -o root needs root; the stand-in environment drops the owner where it is not.
    if os.getuid() != 0:
        command = command.replace("-o root -g root ", "")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    ran = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False, env=env)
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr.splitlines() == [
        "labfleet: host pc01: dataset imagenet: fetching s3:lab-data/imagenet/train from http://s3.lab:9000 failed "
        "(rclone exit 1): 2026/12/02 12:30:00 ERROR : d0/f2.bin: Failed to copy: connection refused; "
        "run again: what arrived whole is kept and not fetched twice"
    ]
    assert list(dest.iterdir()) == [], "a failed fetch put something in place"


def test_staged_files_are_renamed_into_place_and_a_killed_move_leaves_the_rest_staged(tmp_path):
    dest, staging = tmp_path / "imagenet", tmp_path / "incoming"
    for root, text in ((dest, "old"), (staging, "new")):
        (root / "a b").mkdir(parents=True)
        (root / "a b" / "x.bin").write_text(text)
    (dest / "kept.bin").write_text("kept")
    (staging / "new dir" / "deeper").mkdir(parents=True)
    (staging / "new dir" / "deeper" / "n.bin").write_text("n")
    (staging / "top.bin").write_text("t")
    staged = (staging / "a b" / "x.bin").stat().st_ino

    def move(staging_root: Path) -> subprocess.CompletedProcess:
        script = f"find {staging_root} -type d | sh -c '{datasets_s3.MOVE_INTO_PLACE}' sh {dest} {staging_root}"
        return subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)

    # A move that fails half-way (a directory where a staged file must go) stops with mv's error;
    # what it had not moved yet stays staged, what it moved is whole.
    (dest / "top.bin").mkdir()
    failed = move(staging)
    assert failed.returncode != 0 and "top.bin" in failed.stderr
    assert (staging / "top.bin").read_text() == "t"
    (dest / "top.bin").rmdir()
    assert move(staging).returncode == 0
    assert (dest / "a b" / "x.bin").read_text() == "new"
    assert (dest / "a b" / "x.bin").stat().st_ino == staged, "copied, not renamed"
    assert (dest / "new dir" / "deeper" / "n.bin").read_text() == "n" and (dest / "top.bin").read_text() == "t"
    assert (dest / "kept.bin").read_text() == "kept", "a file the bucket does not name was touched"
    assert [p for p in staging.rglob("*") if p.is_file()] == []
