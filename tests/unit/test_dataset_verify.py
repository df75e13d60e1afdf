"""labfleet/dataset_verify.py: what `./run status --verify` compares, and how a difference reads."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
from test_report import fleet, row

from labfleet import dataset_push, dataset_state, dataset_verify, report
from labfleet.facts.datasets import RcloneCheck, RsyncDryRun, parse_rclone_check


def test_a_dry_run_reads_as_one_drift_line():
    describe = dataset_verify.describe
    assert describe("local:/data/train", {"rc": 0, "changes": [], "errors": []}) is None
    changes = [f">fcst...... d0/f{index}.bin" for index in range(6)] + ["*deleting   extra.txt"]
    assert describe("local:/data/train", {"rc": 0, "changes": changes, "errors": []}) == (
        "7 item(s) differ from local:/data/train: d0/f0.bin, d0/f1.bin, d0/f2.bin, d0/f3.bin, d0/f4.bin and 2 more"
    )
    failed = {"rc": 255, "changes": [], "errors": ["ssh: connect to host 10.0.0.2 port 22: Connection refused"]}
    assert describe("host:pc02:/srv/datasets/ref", failed) == (
        "could not be compared with host:pc02:/srv/datasets/ref (rsync exit 255): "
        "ssh: connect to host 10.0.0.2 port 22: Connection refused"
    )


@pytest.fixture
def two_hosts(raw, tmp_path, monkeypatch):
    from labfleet.settings import build

    source = tmp_path / "train"
    source.mkdir()
    pc01 = build("pc01", {**raw, "datasets": {"train": f"local:{source}", "notes": "manual"}})
    pc02 = build(
        "pc02",
        {**raw, "lan_address": "10.0.0.2", "datasets": {"train": {"source": f"local:{source}", "prune": True}}},
    )
    pc03 = build("pc03", {**raw, "datasets": {"ref": "host:pc02:/srv/datasets/train"}})
    monkeypatch.setattr(dataset_state, "_all_settings", lambda: {"pc01": pc01, "pc02": pc02, "pc03": pc03})
    return pc01, pc02, pc03


def test_without_verify_nothing_is_read_or_compared(two_hosts, monkeypatch):
    monkeypatch.delenv(dataset_verify.VERIFY_ENV, raising=False)
    pc01, _, pc03 = two_hosts
    assert dataset_verify.reads(pc03) == {}
    assert dataset_verify.differences(pc01, {}) == {}


def test_a_pull_is_compared_by_checksum_on_the_puller_in_the_batch(two_hosts, monkeypatch):
    monkeypatch.setenv(dataset_verify.VERIFY_ENV, "1")
    pc01, _, pc03 = two_hosts
    assert dataset_verify.reads(pc01) == {}, "local: datasets are compared from the controller"
    (read,) = dataset_verify.reads(pc03).values()
    assert read.fact is RsyncDryRun
    command = read.kwargs["command"]
    assert "--checksum" in command.split() and "--delete" not in command.split()
    assert " labfleet-sync@10.0.0.2:./ /srv/datasets/ref/" in command
    found = {"verify ref": {"rc": 0, "changes": [">fcs....... a.bin"], "errors": []}}
    assert dataset_verify.differences(pc03, found) == {
        "ref": "1 item(s) differ from host:pc02:/srv/datasets/train: a.bin; a deploy does not redo a sync it "
        "recorded: remove those files and /var/lib/labfleet/datasets/ref.record on pc03, then deploy"
    }


def test_a_push_is_compared_by_checksum_from_the_controller(two_hosts, monkeypatch):
    monkeypatch.setenv(dataset_verify.VERIFY_ENV, "1")
    pc01, pc02, _ = two_hosts
    ran = []

    def rsync(argv, **kwargs):
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0, ">fc........ d0/f1.bin\n*deleting   mine.txt\n", "")

    monkeypatch.setattr(dataset_push.subprocess, "run", rsync)
    monkeypatch.setattr(dataset_verify, "host", SimpleNamespace(name="pc02", data={"_sudo": True}))
    assert dataset_verify.differences(pc02, {}) == {
        "train": f"2 item(s) differ from local:{pc02.datasets[0].source.path}: d0/f1.bin, mine.txt; a deploy does "
        "not redo a sync it recorded: remove those files and /var/lib/labfleet/datasets/train.record on pc02, "
        "then deploy"
    }
    (argv,) = ran
    assert {"--checksum", "--dry-run", "--delete"} <= set(argv), "prune: what the next sync would delete is drift"
    assert argv[argv.index("--rsync-path") + 1] == "sudo -n rsync"

    ran.clear()
    monkeypatch.setattr(dataset_verify, "host", SimpleNamespace(name="pc01", data={}))
    assert list(dataset_verify.differences(pc01, {})) == ["train"], "manual datasets are not compared"
    (argv,) = ran
    assert "--delete" not in argv, "without prune, files a member added are not drift"
    assert "--rsync-path" not in argv


def test_a_dataset_that_differs_is_drift_and_shows_in_its_cell():
    why = "1 item(s) differ from local:/data/train: a.bin"
    rows = fleet(row("pc01"), row("pc02", datasets={"imagenet": "present"}, dataset_drift={"imagenet": why}))
    reasons = report.drift(rows)
    assert reasons == {"pc01": [], "pc02": [f"dataset imagenet: {why}"]}
    table = report.table(rows, reasons)
    assert "imagenet:differs" in table and "imagenet:present" in table


def test_an_s3_copy_is_checked_against_its_bucket_on_the_host(raw, tmp_path, monkeypatch):
    from labfleet.settings import build

    keys = tmp_path / "keys.ini"
    keys.write_text("[default]\naws_access_key_id = AKIAX\naws_secret_access_key = secret\n")
    spec = {"source": "s3:lab-data/train", "s3_endpoint": "https://s3.lab:9000", "s3_credentials_file": str(keys)}
    pc01 = build("pc01", {**raw, "datasets": {"train": spec}})
    pruned = build("pc01", {**raw, "datasets": {"train": {**spec, "prune": True}}})
    monkeypatch.setattr(dataset_state, "_all_settings", lambda: {"pc01": pc01})
    monkeypatch.setenv(dataset_verify.VERIFY_ENV, "1")
    (read,) = dataset_verify.reads(pc01).values()
    assert read.fact is RcloneCheck
    assert read.kwargs["command"].endswith(" check bucket:lab-data/train /srv/datasets/train --one-way")
    assert "--one-way" not in dataset_verify.reads(pruned)["verify train"].kwargs["command"]

    # A stand-in rclone prints check's combined list and exits 1, as rclone does on a difference.
    fake = tmp_path / "rclone"
    fake.write_text(
        "#!/bin/sh\nprintf '= a.bin\\n- gone.bin\\n* d/changed.bin\\n+ extra.txt\\n'\n"
        "echo '2026/12/02 12:00:00 ERROR : d/changed.bin: sizes differ' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    command = RcloneCheck().command(read.kwargs["command"].replace("rclone", str(fake), 1))
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()
    found = {"verify train": RcloneCheck().process(output)}
    record = "/var/lib/labfleet/datasets/train.record"
    assert dataset_verify.differences(pc01, found) == {
        "train": "2 item(s) differ from s3:lab-data/train: gone.bin, d/changed.bin; a deploy does not redo a sync "
        f"it recorded: remove those files and {record} on pc01, then deploy"
    }
    # With prune, a file only on the host is what the next sync deletes.
    monkeypatch.setattr(dataset_state, "_all_settings", lambda: {"pc01": pruned})
    assert dataset_verify.differences(pruned, found)["train"].startswith(
        "3 item(s) differ from s3:lab-data/train: gone.bin, d/changed.bin, extra.txt;"
    )
    assert parse_rclone_check(["= a.bin", "labfleet-rc=0"])["paths"] == []

    fake.write_text("#!/bin/sh\necho '2026/12/02 12:00:00 ERROR : : error reading source root directory' >&2\nexit 3\n")
    output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout.splitlines()
    assert dataset_verify.differences(pc01, {"verify train": RcloneCheck().process(output)}) == {
        "train": "could not be compared with s3:lab-data/train (rclone exit 3): "
        "ERROR : : error reading source root directory"
    }
