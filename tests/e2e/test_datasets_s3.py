"""labfleet/datasets_s3.py on a real host against a real S3-compatible server.

The server is moto's server mode, started by the test on the controller's 127.0.0.1; the
test host reaches it on its own 127.0.0.1 through an SSH remote forward
(tests/e2e/harness/tunnel.py). The test fills the bucket itself with boto3. rclone is the
distribution's package, installed on the host by the deploy.

Read-only in the container is not run here: it needs an engine host and the image, and it
is a property of the datasets root's mount, the same for every kind (test_bringup.py and
test_security.py check it; tests/unit/test_datasets_s3.py checks that an s3: dataset adds
no mount of its own).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from .harness.command_log import CommandLog
from .harness.hosts import host_exec
from .harness.runner import REPO_ROOT, assert_converged, assert_no_changes, write_inventory
from .harness.s3 import moto_s3
from .harness.tunnel import forward_to_host
from .test_datasets import DEPLOY, host_digests, inodes, stat, verify_status

ROOT = "/srv/datasets"
BUCKET = "lab-data"
PREFIX = "imagenet/train"
KEY_ID = "AKIALABFLEETTEST0001"
SECRET = "labfleetTestSecret/Do+Not+Print+0123456789abcd"
BIG_MB = 64
FETCH = f"Fetch dataset train from s3:{BUCKET}/{PREFIX}"
STEP = "Lay out the dataset directories"


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("deploy") / "datasets_deploy.py"
    path.write_text(DEPLOY)
    return str(path)


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 on the controller's loopback, on a free port; yields (port, boto3 client)."""
    with moto_s3(KEY_ID, SECRET) as server:
        yield server


def fill_bucket(client) -> dict[str, bytes]:
    """Small objects in nested "directories", one big object, a manifest, and one object outside the prefix."""
    client.create_bucket(Bucket=BUCKET)
    objects = {f"d{i % 4}/s{i % 3}/f{i:03d}.bin": os.urandom(200 + 37 * i) for i in range(30)}
    objects["big.bin"] = os.urandom(BIG_MB * 1024 * 1024)
    put_all(client, objects)
    client.put_object(Bucket=BUCKET, Key="imagenet/val/elsewhere.bin", Body=b"not in the prefix\n")
    return objects


def put_all(client, objects: dict[str, bytes], only: tuple[str, ...] | None = None) -> None:
    """Upload objects (or only some of them) and the manifest of all of them."""
    manifest = "".join(f"{hashlib.sha256(body).hexdigest()}  {key}\n" for key, body in sorted(objects.items()))
    for key, body in {**objects, "SHA256SUMS": manifest.encode()}.items():
        if only is None or key in only or key == "SHA256SUMS":
            client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=body)


def digests(objects: dict[str, bytes]) -> dict[str, str]:
    manifest = "".join(f"{hashlib.sha256(body).hexdigest()}  {key}\n" for key, body in sorted(objects.items()))
    return {key: hashlib.sha256(body).hexdigest() for key, body in {**objects, "SHA256SUMS": manifest.encode()}.items()}


# Every rclone the host runs, logged.
RCLONE = CommandLog("rclone")
LOG_RCLONE, rclone_calls = RCLONE.install, RCLONE.calls


STOP_THE_FETCH = r"""
# Wait for the rclone that fetches into staging (not the dry run), stop it, and step it on
# until big.bin is partly written; print its pid, stopped.
for i in $(seq 12000); do
  for p in $(pgrep -x rclone); do
    if tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null | grep -q -- --files-from-raw; then
      kill -STOP $p
      for j in $(seq 2000); do
        if find {staging} -name big.bin -size +1M 2>/dev/null | grep -q .; then echo $p; exit 0; fi
        kill -CONT $p; sleep 0.005; kill -STOP $p
      done
      echo "big.bin never appeared in staging" >&2; exit 1
    fi
  done
  sleep 0.01
done
echo "no fetching rclone" >&2; exit 1
"""


def test_a_bucket_arrives_byte_exact_only_changes_move_and_nothing_is_deleted_without_prune(
    make_hosts, pyinfra_run, deploy, s3_server, tmp_path
):
    port, client = s3_server
    objects = fill_bucket(client)
    (host,) = make_hosts(1)
    keys = tmp_path / "lab-s3.ini"
    keys.write_text(f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    dest, staging = f"{ROOT}/train", f"{ROOT}/.labfleet-incoming/train"

    with forward_to_host(host, port) as endpoint:
        spec = {
            "source": f"s3:{BUCKET}/{PREFIX}",
            "s3_endpoint": endpoint,
            "s3_credentials_file": str(keys),
            "manifest": "SHA256SUMS",
        }
        data = {"datasets": {"train": spec}}

        # The first fetch is stopped mid-file: its process arguments hold no key, and once
        # killed, nothing half-written is in place.
        (tmp_path / "inventory").mkdir()
        inventory = write_inventory(tmp_path / "inventory", [host], data)
        command = [str(Path(REPO_ROOT, ".venv/bin/pyinfra")), "-y", "--json", str(inventory), deploy]
        if not Path(command[0]).exists():
            command[0:1] = ["pyinfra"]
        watcher = subprocess.Popen(
            ["docker", "exec", host.container, "sh", "-c", STOP_THE_FETCH.replace("{staging}", staging)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        log = tmp_path / "pyinfra.log"
        run = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        try:
            out, err = watcher.communicate(timeout=400)
            assert watcher.returncode == 0, f"{host.name}: {err}"
            pid = out.strip()
            processes = host_exec(host, "ps -eo args").stdout
            assert "rclone --config /etc/labfleet/dataset-s3/train.conf" in processes, processes
            assert SECRET not in processes and KEY_ID not in processes, "a key is in a process's arguments"
            environ = host_exec(host, f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
            assert SECRET not in environ and KEY_ID not in environ, "a key is in rclone's environment"
            host_exec(host, f"kill -KILL {pid}")
            first_out, _ = run.communicate(timeout=120)
        finally:
            for process in (watcher, run):
                if process.poll() is None:
                    process.kill()
                    process.wait()
        first_err = log.read_text()
        assert run.returncode != 0, "pyinfra reported success for a killed fetch"
        assert re.search(
            rf"labfleet: host {host.name}: dataset train: fetching s3:{BUCKET}/{PREFIX} from {endpoint} failed "
            r"\(rclone exit 137\): killed or stopped; run again: what arrived whole is kept and not fetched twice",
            first_err,
        ), first_err[-3000:]
        assert host_exec(host, f"test -e {dest}/big.bin", check=False).returncode != 0, "a partial big.bin in place"
        # Root only (the setgid bit comes from the datasets root): the container sees no partial file.
        assert host_exec(host, f"stat -c '%U %G %a' {ROOT}/.labfleet-incoming {staging}").stdout.split() == [
            "root", "root", "2700", "root", "root", "2700",
        ]  # fmt: skip

        rerun = pyinfra_run([host], deploy=deploy, data=data)
        assert_converged(rerun)
        assert rerun.status(host, "Verify dataset train against SHA256SUMS") == "success"
        expected = digests(objects)
        assert host_digests(host, dest) == expected, f"{host.name}: the copy differs from the bucket"
        assert host_exec(host, f"find {staging} -mindepth 1").stdout == "", "staging was not emptied"
        assert stat(host, dest) == ("root", "labdata", "2755")
        assert stat(host, f"{dest}/d1/s1") == ("root", "labdata", "2755")
        assert stat(host, f"{dest}/big.bin") == ("root", "labdata", "644")
        assert stat(host, "/etc/labfleet/dataset-s3/train.conf") == ("root", "root", "600")
        assert stat(host, "/etc/labfleet/dataset-s3") == ("root", "root", "700")
        for said in (first_out, first_err, rerun.stdout, rerun.stderr):
            assert SECRET not in said and KEY_ID not in said, "a key is in pyinfra's output"

        # Nothing changed: the bucket's listing, taken once, equals the host's record
        # (labfleet.dataset_upstream): no fetch, no dry run, no dataset operation planned.
        host_exec(host, LOG_RCLONE)
        second = pyinfra_run([host], deploy=deploy, data=data)
        assert_no_changes(second)
        calls = rclone_calls(host)
        assert len(calls) == 1 and " lsf " in calls[0], f"{host.name}: a no-change run ran {calls}"
        assert not [op["name"] for op in second.ops if "dataset" in op["name"]], "a dataset operation was planned"
        before = inodes(host, dest)

        # One object changes (same size), one is new, one is deleted from the bucket: only
        # the changed and the new one (and the manifest) are written, the deleted one stays.
        changed, added, deleted = "d2/s1/f010.bin", "d0/new.bin", "d3/s2/f011.bin"
        objects[changed] = os.urandom(len(objects[changed]))
        objects[added] = os.urandom(300)
        gone = objects.pop(deleted)
        client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{deleted}")
        put_all(client, objects, only=(changed, added))
        third = pyinfra_run([host], deploy=deploy, data=data)
        assert_converged(third)
        assert third.status(host, FETCH) == "success"
        after = inodes(host, dest)
        rewritten = sorted(path for path in after if after[path] != before.get(path))
        assert rewritten == sorted([changed, added, "SHA256SUMS"]), f"{host.name}: rewritten {rewritten}"
        assert host_digests(host, dest) == {**digests(objects), deleted: hashlib.sha256(gone).hexdigest()}
        assert_no_changes(pyinfra_run([host], deploy=deploy, data=data))

        # The record removed by hand: the fetch is planned again, moves nothing, and the
        # record is written back; the dataset directory removed: it is fetched whole.
        host_exec(host, "rm /var/lib/labfleet/datasets/train.record")
        before = inodes(host, dest)
        rerecorded = pyinfra_run([host], deploy=deploy, data=data)
        assert_converged(rerecorded)
        assert rerecorded.status(host, "Record the verified sync of dataset train") == "success"
        assert inodes(host, dest) == before, "files were rewritten"
        host_exec(host, f"rm -rf {dest}")
        assert_converged(pyinfra_run([host], deploy=deploy, data=data))
        assert host_digests(host, dest) == digests(objects)
        assert_no_changes(pyinfra_run([host], deploy=deploy, data=data))

        # A file changed by hand with its size and time kept: a deploy does not see it,
        # status --verify does (rclone check: sizes and MD5s), and its advice repairs it.
        quiet = "d1/s1/f001.bin"
        host_exec(
            host,
            f"cd {dest} && t=$(stat -c %y {quiet}) && printf 'X' | dd of={quiet} conv=notrunc status=none "
            f'&& touch -d "$t" {quiet}',
        )
        assert_no_changes(pyinfra_run([host], deploy=deploy, data=data))
        record = "/var/lib/labfleet/datasets/train.record"
        assert verify_status([host], data, pyinfra_run) == {
            host.name: {
                "train": f"1 item(s) differ from s3:{BUCKET}/{PREFIX}: {quiet}; a deploy does not redo a sync it "
                f"recorded: remove those files and {record} on {host.name}, then deploy"
            }
        }
        host_exec(host, f"rm {dest}/{quiet} {record}")
        assert_converged(pyinfra_run([host], deploy=deploy, data=data))
        assert host_digests(host, dest) == digests(objects)
        assert verify_status([host], data, pyinfra_run) == {host.name: {}}

        pruned = {"datasets": {"train": {**spec, "prune": True}}}
        host_exec(host, f"echo mine > {dest}/extra.txt")
        assert_converged(pyinfra_run([host], deploy=deploy, data=pruned))
        assert host_digests(host, dest) == digests(objects), "prune left a file the bucket does not have"
        assert_no_changes(pyinfra_run([host], deploy=deploy, data=pruned))

        # A bucket that is not there fails the host with rclone's own error on one line.
        missing = {"datasets": {"gone": {**spec, "source": "s3:no-such-bucket/x"}}}
        failed = pyinfra_run([host], deploy=deploy, data=missing, expect_fail=True)
        assert failed.errors() == [(host.name, f"{STEP} | Fetch dataset gone from s3:no-such-bucket/x")]
        assert re.search(
            rf"labfleet: host {host.name}: dataset gone: rclone cannot read s3:no-such-bucket/x from {endpoint} "
            r"\(rclone exit [1-9]\d*\): .*\S.*; check s3_endpoint, the bucket and prefix, and the keys in "
            "s3_credentials_file",
            failed.stderr,
        ), failed.stderr_tail()
        assert SECRET not in failed.stderr and SECRET not in failed.stdout
