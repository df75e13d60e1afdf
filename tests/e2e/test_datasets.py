"""labfleet/datasets.py on real hosts: layout, local pushes, peer pulls, prune, killed transfers.

The runs use a deploy with only the preflight and datasets steps, so the tests do not wait
for Docker. The NFS source is covered by tests/unit/test_datasets.py only: the kernel these
test hosts share has no NFS client (no "nfs" in /proc/filesystems), so nothing can mount an
export here, whichever server serves it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .harness.command_log import CommandLog
from .harness.engine import docker
from .harness.hosts import host_exec
from .harness.runner import REPO_ROOT, assert_converged, assert_no_changes, write_inventory

ROOT = "/srv/datasets"
BIG_MB = 50
STEP = "Lay out the dataset directories"

DEPLOY = """\
from pyinfra import host

from labfleet import datasets, preflight
from labfleet.settings import for_host

settings = for_host(host)
preflight.check_host(settings)
datasets.lay_out_datasets(settings)
"""


# The same steps with deploy.py's one read ahead: what a no-change run costs each host in round trips.
READ_AHEAD_DEPLOY = """\
from pyinfra import host

from labfleet import certs, datasets, planning, preflight
from labfleet.settings import for_host

settings = for_host(host)
planning.read_ahead(preflight.reads(settings), certs.reads(settings), datasets.reads(settings))
preflight.check_host(settings)
datasets.lay_out_datasets(settings)
"""


@pytest.fixture(scope="module", autouse=True)
def listings_cache(tmp_path_factory):
    """The controller's listings of the sources these tests make (labfleet.dataset_changes) stay
    in the test's temporary directory, not in the cache of the user who runs the tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("deploy") / "datasets_deploy.py"
    path.write_text(DEPLOY)
    return str(path)


@pytest.fixture(scope="module")
def read_ahead_deploy(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("deploy") / "datasets_read_ahead.py"
    path.write_text(READ_AHEAD_DEPLOY)
    return str(path)


def assert_one_round_trip(run, hosts) -> None:
    """A --debug run ran one command per host: the planning batch, and nothing while executing."""
    commands = {
        host.name: re.findall(rf"Running command on {re.escape(host.name)}: (.*)", run.stderr) for host in hosts
    }
    assert all(len(ran) == 1 for ran in commands.values()), "round trips per host: " + "\n".join(
        f"{name}: {len(ran)}\n  " + "\n  ".join(command[:160] for command in ran) for name, ran in commands.items()
    )


def make_dataset(root: Path, files: int = 300, big_mb: int = BIG_MB, seed: int = 8) -> Path:
    """A few hundred small files in nested directories, one big file, and a SHA256SUMS manifest."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for index in range(files):
        directory = root / f"d{index % 10:02d}" / f"s{index % 7}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{index:04d}.bin").write_bytes(rng.randbytes(rng.randint(100, 4000)))
    if big_mb:
        with open(root / "big.bin", "wb") as big:
            for _ in range(big_mb):
                big.write(os.urandom(1024 * 1024))
    write_manifest(root)
    return root


def write_manifest(root: Path) -> None:
    lines = [f"{digest}  {path}" for path, digest in sorted(local_digests(root).items()) if path != "SHA256SUMS"]
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def local_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in root.rglob("*")
        if path.is_file()
    }


def host_digests(host, directory: str) -> dict[str, str]:
    listed = host_exec(host, f"cd {directory} && find . -type f -print0 | xargs -0 -r sha256sum", timeout=600)
    digests = {}
    for line in listed.stdout.splitlines():
        digest, _, path = line.partition("  ")
        digests[path.removeprefix("./")] = digest
    return digests


def inodes(host, directory: str) -> dict[str, str]:
    """path -> "inode ctime" of every file: a file that rsync rewrote gets a new inode and ctime."""
    listed = host_exec(host, f"cd {directory} && find . -type f -printf '%P %i %C@\\n'").stdout
    return {line.split(" ")[0]: line.split(" ", 1)[1] for line in listed.splitlines()}


def bridge_ip(host) -> str:
    """The test host's address on the Docker bridge: how the other test hosts reach it."""
    inspected = docker(
        "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", host.container
    )
    return inspected.stdout.split()[0]


def lan(hosts) -> dict[str, dict]:
    return {host.name: {"lan_address": bridge_ip(host), "lan_ssh_port": 22} for host in hosts}


def stat(host, path: str) -> tuple[str, str, str]:
    owner, group, mode = host_exec(host, f"stat -c '%U %G %a' {path}").stdout.split()
    return owner, group, mode


# Every rsync the host runs, logged: the controller's push runs "sudo -n rsync --server" there.
RSYNC = CommandLog("rsync")
RSYNC_LOG, LOG_RSYNC = RSYNC.log, RSYNC.install
rsync_calls = RSYNC.calls


def verify_status(hosts, data, pyinfra_run) -> dict[str, dict]:
    """`./run status --verify` as JSON: host name -> its dataset drift (these hosts have no
    Docker, so the status always drifts and exits non-zero)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABFLEET_STATUS_FORMAT", "json")
        patch.setenv("LABFLEET_STATUS_VERIFY", "1")
        result = pyinfra_run(hosts, deploy="status.py", data=data, expect_fail=True)
    assert "Traceback" not in result.stderr, result.stderr_tail()
    document, _ = json.JSONDecoder().raw_decode(result.stdout.lstrip())
    return {entry["host"]: entry["dataset_drift"] for entry in document["hosts"]}


def test_push_to_three_hosts_moves_only_what_changed(make_hosts, pyinfra_run, deploy, read_ahead_deploy, tmp_path):
    """Also: a no-change run runs no rsync on any host (the host's record of its last verified
    sync decides, against one walk of the source), a touched source file syncs again, and a
    file changed by hand on a host is not fixed by a deploy but is reported by status --verify."""
    source = make_dataset(tmp_path / "train")
    # A second local: dataset: the two pushes to each host run at once (PARALLEL_PUSHES).
    labels = make_dataset(tmp_path / "labels", files=30, big_mb=0, seed=3)
    data = {
        "datasets": {
            "train": {"source": f"local:{source}", "manifest": "SHA256SUMS"},
            "labels": {"source": f"local:{labels}", "manifest": "SHA256SUMS"},
        }
    }
    hosts = make_hosts(3)

    first = pyinfra_run(hosts, deploy=deploy, data=data)
    assert_converged(first)
    expected = local_digests(source)
    for host in hosts:
        assert first.status(host, "Push datasets from the controller") == "success"
        assert first.status(host, "Verify dataset train against SHA256SUMS") == "success"
        assert host_digests(host, f"{ROOT}/train") == expected, f"{host.name}: the copy differs from the source"
        assert host_digests(host, f"{ROOT}/labels") == local_digests(labels), f"{host.name}: labels differ"
        assert first.status(host, "Verify dataset labels against SHA256SUMS") == "success"
        assert stat(host, ROOT) == ("root", "labdata", "2755")
        assert stat(host, f"{ROOT}/train") == ("root", "labdata", "2755")
        assert stat(host, f"{ROOT}/train/d01/s1") == ("root", "labdata", "2755")
        assert stat(host, f"{ROOT}/train/big.bin") == ("root", "labdata", "644")
        acl = host_exec(host, f"getfacl --omit-header --default {ROOT}/train").stdout.split()
        assert acl == ["user::rwx", "group::r-x", "other::r-x"], f"{host.name}: {acl}"
        assert "labdata" in host_exec(host, "id -nG lab").stdout.split(), f"{host.name}: lab is not in labdata"
        record = host_exec(host, "cat /var/lib/labfleet/datasets/train.record").stdout.splitlines()
        assert record[0] == "labfleet-dataset-record 1" and record[-1] == "end", f"{host.name}: {record}"
        host_exec(host, LOG_RSYNC)
    before = {host.name: inodes(host, f"{ROOT}/train") for host in hosts}

    # Nothing changed: nothing moves, no file is rewritten, the manifest is not hashed again,
    # and no rsync runs on any host: the host's tree is not walked.
    second = pyinfra_run(hosts, deploy=deploy, data=data)
    assert_no_changes(second)
    assert not [op["name"] for op in second.ops if "dataset" in op["name"]], "a dataset operation was planned"
    for host in hosts:
        assert inodes(host, f"{ROOT}/train") == before[host.name], f"{host.name}: files were rewritten"
        assert rsync_calls(host) == [], f"{host.name}: a no-change run ran rsync"
    # One round trip per host, as without datasets: the records come with the planning batch.
    counted = pyinfra_run(hosts, deploy=read_ahead_deploy, data=data, args=("--debug",))
    assert_no_changes(counted)
    assert_one_round_trip(counted, hosts)

    # A touched source file (its time only) syncs again: rsync runs and sets the time.
    touched = source / "d05" / "s5" / "f0005.bin"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    retimed = pyinfra_run(hosts, deploy=deploy, data=data)
    assert_converged(retimed)
    for host in hosts:
        assert retimed.status(host, "Push datasets from the controller") == "success"
        assert any("--server" in call for call in rsync_calls(host)), f"{host.name}: the touched file did not sync"
        mtime = host_exec(host, f"stat -c %Y {ROOT}/train/d05/s5/f0005.bin").stdout.strip()
        assert int(mtime) == int(touched.stat().st_mtime), f"{host.name}: the time was not synced"
    assert_no_changes(pyinfra_run(hosts, deploy=deploy, data=data))
    before = {host.name: inodes(host, f"{ROOT}/train") for host in hosts}

    # One file changes: only it (and the manifest that lists it) moves.
    changed = "d03/s3/f0003.bin"
    (source / changed).write_bytes(b"a new version of this file\n")
    write_manifest(source)
    third = pyinfra_run(hosts, deploy=deploy, data=data)
    assert_converged(third)
    expected = local_digests(source)
    for host in hosts:
        # Only those two paths were given to rsync (labfleet.dataset_changes): the host's rsync
        # ran with --relative (R) and without recursing (d, not r).
        (call,) = [c for c in rsync_calls(host) if "--server" in c and "/srv/datasets/train/" in c]
        options = call.split()[1].split(".")[0]
        assert "R" in options and "r" not in options, f"{host.name}: {call}"
        assert third.status(host, "Verify dataset train against SHA256SUMS") == "success"
        after = inodes(host, f"{ROOT}/train")
        rewritten = sorted(path for path in after if after[path] != before[host.name].get(path))
        assert rewritten == sorted([changed, "SHA256SUMS"]), f"{host.name}: rewritten {rewritten}"
        assert host_digests(host, f"{ROOT}/train") == expected
        # labels did not change: planned after train's push, its record is read, not rewritten.
        assert [op for op in third.changed(host) if "labels" in op] == [], f"{host.name}: {third.changed(host)}"
    assert_no_changes(pyinfra_run(hosts, deploy=deploy, data=data))

    # Files changed by hand: on one host with the same size and time (rsync's quick check
    # cannot see it, so --verify must compare checksums), on another with a plain edit (which
    # a dry run would see). A deploy fixes neither; status --verify names both, and no more.
    same_size, edited = hosts[0], hosts[1]
    quiet, loud = "d02/s2/f0002.bin", "d04/s4/f0004.bin"
    other_byte = (source / quiet).read_bytes()[0] ^ 0xFF
    host_exec(
        same_size,
        f"cd {ROOT}/train && t=$(stat -c %y {quiet}) && printf '\\{other_byte:03o}' "
        f'| dd of={quiet} conv=notrunc status=none && touch -d "$t" {quiet}',
    )
    host_exec(edited, f"echo edited by hand >> {ROOT}/train/{loud}")
    for host in hosts:
        rsync_calls(host)
    assert_no_changes(pyinfra_run(hosts, deploy=deploy, data=data))
    assert [call for host in hosts for call in rsync_calls(host)] == [], "a no-change run ran rsync"
    assert host_digests(same_size, f"{ROOT}/train")[quiet] != expected[quiet]
    assert host_digests(edited, f"{ROOT}/train")[loud] != expected[loud], "the deploy fixed a hand edit"
    drift = verify_status(hosts, data, pyinfra_run)

    def told(path: str, host) -> str:
        return (
            f"1 item(s) differ from local:{source}: {path}; a deploy does not redo a sync it recorded: remove "
            f"those files and /var/lib/labfleet/datasets/train.record on {host.name}, then deploy"
        )

    assert drift == {same_size.name: {"train": told(quiet, same_size)}, edited.name: {"train": told(loud, edited)},
                     hosts[2].name: {}}  # fmt: skip

    # What the drift line says to do makes the next deploy sync those hosts, and only them.
    host_exec(same_size, f"rm {ROOT}/train/{quiet} /var/lib/labfleet/datasets/train.record")
    host_exec(edited, f"rm {ROOT}/train/{loud} /var/lib/labfleet/datasets/train.record")
    repaired = pyinfra_run(hosts, deploy=deploy, data=data)
    assert_converged(repaired)
    pushed = [h.name for h in hosts if repaired.status(h, "Push datasets from the controller") == "success"]
    assert pushed == [same_size.name, edited.name]
    for host in hosts:
        assert host_digests(host, f"{ROOT}/train") == expected, f"{host.name}: not repaired"
    assert_no_changes(pyinfra_run(hosts, deploy=deploy, data=data))


def test_peers_pull_in_a_chain_with_keys_that_can_only_read(
    make_hosts, pyinfra_run, deploy, read_ahead_deploy, tmp_path
):
    source = make_dataset(tmp_path / "ref", files=120, big_mb=5)
    first_host, second_host, third_host = hosts = make_hosts(3)
    host_data = lan(hosts)
    host_data[first_host.name]["datasets"] = {"ref": {"source": f"local:{source}", "manifest": "SHA256SUMS"}}
    # pc3 pulls from pc2, which pulls from pc1 in the same run: pulls are ordered by depth.
    host_data[second_host.name]["datasets"] = {"ref": f"host:{first_host.name}:{ROOT}/ref"}
    host_data[third_host.name]["datasets"] = {
        "ref": {"source": f"host:{second_host.name}:{ROOT}/ref", "manifest": "SHA256SUMS"}
    }

    first = pyinfra_run(hosts, deploy=deploy, host_data=host_data)
    assert_converged(first)
    expected = local_digests(source)
    for host in hosts:
        assert host_digests(host, f"{ROOT}/ref") == expected, f"{host.name}: the copy differs from the source"
    assert first.status(second_host, f"{STEP} | Pull datasets from peers") == "success"
    assert first.status(third_host, f"{STEP} | Pull datasets from peers, hop 2") == "success"
    for host in hosts:
        host_exec(host, LOG_RSYNC)

    # Nothing changed: each puller's record equals its peer's copy (labfleet.dataset_upstream),
    # so no host runs rsync, not even a dry run.
    quiet = pyinfra_run(hosts, deploy=deploy, host_data=host_data)
    assert_no_changes(quiet)
    assert [call for host in hosts for call in rsync_calls(host)] == [], "a no-change run ran rsync"
    # And one round trip per host, as without datasets: the pull keys, the peers' host keys and
    # the authorized keys come with the planning batches, each host's own facts in its own.
    counted = pyinfra_run(hosts, deploy=read_ahead_deploy, host_data=host_data, args=("--debug",))
    assert_no_changes(counted)
    assert_one_round_trip(counted, hosts)

    # A changed source file changes the peer's copy: it is pushed to pc1 and pulled by pc2,
    # then by pc3, in the same run; then nothing again.
    changed = "d03/s3/f0003.bin"
    (source / changed).write_bytes(b"a new version of this file\n")
    write_manifest(source)
    again = pyinfra_run(hosts, deploy=deploy, host_data=host_data)
    assert_converged(again)
    expected = local_digests(source)
    for host in hosts:
        assert host_digests(host, f"{ROOT}/ref") == expected, f"{host.name}: the change did not arrive"
        assert rsync_calls(host), f"{host.name}: ran no rsync"
    assert_no_changes(pyinfra_run(hosts, deploy=deploy, host_data=host_data))

    # A puller's copy removed by hand, and another's record removed: both pull again (the
    # removed copy whole, the other moving nothing), the peer and the others are left alone.
    host_exec(third_host, f"rm -rf {ROOT}/ref")
    host_exec(second_host, "rm /var/lib/labfleet/datasets/ref.record")
    for host in hosts:
        rsync_calls(host)
    repaired = pyinfra_run(hosts, deploy=deploy, host_data=host_data)
    assert_converged(repaired)
    assert host_digests(third_host, f"{ROOT}/ref") == expected
    assert rsync_calls(second_host) and rsync_calls(third_host), "a puller did not pull"
    assert host_exec(second_host, "head -n 1 /var/lib/labfleet/datasets/ref.record").stdout.startswith(
        "labfleet-dataset-record 1"
    ), f"{second_host.name}: the record was not written back"
    assert_no_changes(pyinfra_run(hosts, deploy=deploy, host_data=host_data))

    # The peer accepts the puller's key for a read-only rsync of that one path, and nothing else.
    peer_ip = host_data[first_host.name]["lan_address"]
    ssh = (
        "ssh -i /etc/labfleet/dataset-pull/id_ref -o BatchMode=yes -o IdentitiesOnly=yes "
        "-o UserKnownHostsFile=/etc/labfleet/dataset-pull/known_hosts -o StrictHostKeyChecking=yes"
    )
    shell = host_exec(second_host, f"{ssh} labfleet-sync@{peer_ip} 'id; cat /etc/passwd'", check=False)
    assert shell.returncode != 0 and "uid=" not in shell.stdout and "root:" not in shell.stdout, shell
    write = host_exec(second_host, f"rsync -e '{ssh}' /etc/hostname labfleet-sync@{peer_ip}:./planted", check=False)
    assert write.returncode != 0, f"the pull key could write to the peer: {write}"
    assert host_exec(first_host, f"test -e {ROOT}/ref/planted", check=False).returncode != 0
    outside = host_exec(second_host, f"rsync -e '{ssh}' labfleet-sync@{peer_ip}:/etc/passwd /tmp/stolen", check=False)
    assert host_exec(second_host, "test -e /tmp/stolen", check=False).returncode != 0, outside
    keys = host_exec(first_host, "cat /var/lib/labfleet-sync/.ssh/authorized_keys").stdout
    assert re.search(rf'^restrict,from="{re.escape(host_data[second_host.name]["lan_address"])}",command="', keys, re.M)
    assert "sudo" not in host_exec(first_host, "id -nG labfleet-sync").stdout

    # Fan-out (labfleet/dataset_fanout.py): both pull the first host's copy, which lets one host
    # pull at once (dataset_fanout: 1), so the first by name pulls from it and the other pulls
    # from that one in wave 2. A new file shows who sent it: every rsync on the hosts is logged.
    host_data[first_host.name]["dataset_fanout"] = 1
    for puller in (second_host, third_host):
        host_data[puller.name]["datasets"] = {
            "ref": {"source": f"host:{first_host.name}:{ROOT}/ref", "manifest": "SHA256SUMS"}
        }
    early, late = sorted((second_host, third_host), key=lambda h: h.name)
    (source / "added.bin").write_bytes(os.urandom(300_000))
    write_manifest(source)
    for host in hosts:
        # The serving rsync runs as the sync account: it must be able to log too.
        host_exec(host, f"{LOG_RSYNC} && chmod 666 {RSYNC_LOG}")
    fanned = pyinfra_run(hosts, deploy=deploy, host_data=host_data)
    assert_converged(fanned)
    expected = local_digests(source)
    for host in hosts:
        assert host_digests(host, f"{ROOT}/ref") == expected, f"{host.name}: the copy differs from the source"
    assert fanned.status(early, f"{STEP} | Pull datasets from peers") == "success"
    assert fanned.status(late, f"{STEP} | Pull datasets from peers, wave 2") == "success"
    assert f"wave 2: pulling {early.name}:{ROOT}/ref" in fanned.stderr, fanned.stderr_tail()
    senders = {host.name: [c for c in rsync_calls(host) if "--server" in c and "--sender" in c] for host in hosts}
    assert senders[early.name], f"{early.name} did not serve {late.name}: {senders}"
    assert senders[late.name] == [], f"{late.name} served: {senders}"
    late_ip = re.escape(host_data[late.name]["lan_address"])
    served = host_exec(early, "cat /var/lib/labfleet-sync/.ssh/authorized_keys").stdout
    assert re.search(rf'^restrict,from="{late_ip}",command="\S*rrsync -ro {ROOT}/ref" ', served, re.M), served
    # Both recorded their verified pull: the next run changes nothing.
    assert_no_changes(pyinfra_run(hosts, deploy=deploy, host_data=host_data))


def test_extra_files_stay_unless_prune_is_on(make_hosts, pyinfra_run, deploy, tmp_path):
    source = make_dataset(tmp_path / "val", files=40, big_mb=0)
    (host,) = make_hosts(1)
    scratch = {"source": "manual", "readonly": False}
    data = {"datasets": {"val": {"source": f"local:{source}"}, "scratch": scratch}}
    assert_converged(pyinfra_run([host], deploy=deploy, data=data))
    # A writable dataset: lab members write there, and what they write stays group-writable.
    assert stat(host, f"{ROOT}/scratch") == ("root", "labdata", "2775")
    host_exec(host, f"su lab -c 'umask 077; mkdir {ROOT}/scratch/run1 && touch {ROOT}/scratch/run1/log'")
    assert stat(host, f"{ROOT}/scratch/run1/log")[1:] == ("labdata", "664"), "umask 077 won over the default ACL"

    host_exec(host, f"echo mine > {ROOT}/val/extra.txt")
    (source / "d00" / "s0" / "f0000.bin").unlink()
    kept = pyinfra_run([host], deploy=deploy, data=data)
    assert_converged(kept)
    assert host_exec(host, f"cat {ROOT}/val/extra.txt").stdout == "mine\n"
    assert host_exec(host, f"test -f {ROOT}/val/d00/s0/f0000.bin", check=False).returncode == 0
    assert_no_changes(pyinfra_run([host], deploy=deploy, data=data))

    pruned = {"datasets": {"val": {"source": f"local:{source}", "prune": True}, "scratch": scratch}}
    assert_converged(pyinfra_run([host], deploy=deploy, data=pruned))
    assert host_digests(host, f"{ROOT}/val") == local_digests(source)
    assert_no_changes(pyinfra_run([host], deploy=deploy, data=pruned))

    # The dataset directory removed by hand, its record left: the next run syncs it whole and
    # records that sync again (its push removed the record), so the run after it has nothing to do.
    host_exec(host, f"rm -rf {ROOT}/val")
    assert_converged(pyinfra_run([host], deploy=deploy, data=pruned))
    assert host_digests(host, f"{ROOT}/val") == local_digests(source)
    assert_no_changes(pyinfra_run([host], deploy=deploy, data=pruned))


def _rsync_pushing(source: Path) -> int | None:
    """pid of the controller's rsync that really pushes source (not the dry run), if running."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0] == b"rsync" and f"{source}/".encode() in argv and b"--dry-run" not in argv:
            return int(entry.name)
    return None


def test_a_killed_transfer_leaves_no_partial_file_and_a_rerun_completes(make_hosts, pyinfra_run, deploy, tmp_path):
    source = make_dataset(tmp_path / "big", files=50)
    (host,) = make_hosts(1)
    data = {"datasets": {"big": {"source": f"local:{source}", "manifest": "SHA256SUMS"}}}
    (tmp_path / "inventory").mkdir()
    inventory = write_inventory(tmp_path / "inventory", [host], data)
    command = [str(Path(REPO_ROOT, ".venv/bin/pyinfra")), "-y", "--json", str(inventory), deploy]
    if not Path(command[0]).exists():
        command[0:1] = ["pyinfra"]
    log = tmp_path / "pyinfra.log"
    run = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)
    partial = f"find {ROOT}/big -maxdepth 1 -name '.big.bin.*' -size +1M | grep -q ."
    killed = False
    try:
        deadline = time.monotonic() + 300
        pid = None
        while pid is None and time.monotonic() < deadline and run.poll() is None:
            pid = _rsync_pushing(source)
            time.sleep(0.01)
        assert pid is not None, "the push never started"
        # Step the transfer until big.bin is half-written under its temporary name, then kill it.
        for _ in range(400):
            os.kill(pid, signal.SIGSTOP)
            if host_exec(host, partial, check=False).returncode == 0:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)
        run.wait(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert killed, "the transfer finished before it could be interrupted"
    assert run.returncode != 0, "pyinfra reported success for a killed transfer"
    stderr = log.read_text()
    assert re.search(
        rf"labfleet: host {host.name}: push {re.escape(str(source))} -> {ROOT}/big failed \(killed by signal 9\): ",
        stderr,
    ), f"no one-line failure for the killed push: {stderr[-2000:]}"

    # The receiving rsync notices the lost connection and cleans up; wait until it has exited.
    for _ in range(600):
        if host_exec(host, "pgrep -x rsync", check=False).returncode != 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{host.name}: rsync still runs after the push was killed")
    # Whatever arrived is whole: no file sits under its final name with partial content, and
    # rsync's temporary files (".big.bin.XXXXXX", ".~tmp~") are gone. The source has no dot files.
    leftovers = host_exec(host, f"find {ROOT}/big -name '.*'").stdout.split()
    assert leftovers == [], f"{host.name}: the killed transfer left temporary files behind: {leftovers}"
    expected = local_digests(source)
    for path, digest in host_digests(host, f"{ROOT}/big").items():
        assert digest == expected[path], f"{host.name}: {path} is corrupt after the killed transfer"

    rerun = pyinfra_run([host], deploy=deploy, data=data)
    assert_converged(rerun)
    assert rerun.status(host, "Verify dataset big against SHA256SUMS") == "success"
    assert host_digests(host, f"{ROOT}/big") == expected
    assert host_exec(host, f"find {ROOT}/big -name '.*'").stdout.split() == []
    assert_no_changes(pyinfra_run([host], deploy=deploy, data=data))


def test_a_manifest_mismatch_fails_the_host_and_names_the_file(make_hosts, pyinfra_run, deploy, tmp_path):
    source = make_dataset(tmp_path / "bad", files=20, big_mb=0)
    (source / "d01" / "s1" / "f0001.bin").write_bytes(b"not what the manifest says\n")
    (host,) = make_hosts(1)
    data = {"datasets": {"bad": {"source": f"local:{source}", "manifest": "SHA256SUMS"}}}
    failed = pyinfra_run([host], deploy=deploy, data=data, expect_fail=True)
    assert (host.name, f"{STEP} | Verify dataset bad against SHA256SUMS") in failed.errors()
    assert "d01/s1/f0001.bin: FAILED" in failed.stderr and "does not match its manifest" in failed.stderr

    write_manifest(source)
    assert_converged(pyinfra_run([host], deploy=deploy, data=data))
    assert_no_changes(pyinfra_run([host], deploy=deploy, data=data))


def test_what_only_the_hosts_know_fails_one_host_with_one_line(make_hosts, pyinfra_run, deploy, tmp_path):
    """Five failures that a host reports while the run executes, on three hosts in two runs."""
    source = make_dataset(tmp_path / "ref", files=20, big_mb=0)
    own = make_dataset(tmp_path / "own", files=5, big_mb=0, seed=9)
    peer, puller, third = hosts = make_hosts(3)
    host_data = lan(hosts)

    # The peer serves ref, and its manual dataset lacks the manifest it names; the third
    # host pulls a path that the peer does not have.
    host_data[peer.name]["datasets"] = {
        "ref": f"local:{source}",
        "notes": {"source": "manual", "manifest": "SHA256SUMS"},
    }
    host_data[puller.name]["datasets"] = {"ref": f"host:{peer.name}:{ROOT}/ref"}
    host_data[third.name]["datasets"] = {"gone": f"host:{peer.name}:/srv/nowhere"}
    first = pyinfra_run(hosts, deploy=deploy, host_data=host_data, expect_fail=True)
    assert sorted(first.errors()) == sorted(
        [
            (peer.name, f"{STEP} | Verify dataset notes against SHA256SUMS"),
            (third.name, f"{STEP} | Pull datasets from peers"),
        ]
    ), first.stderr_tail()
    assert (
        f"labfleet: host {peer.name}: dataset notes has no manifest SHA256SUMS; add it to the source or drop manifest"
    ) in first.stderr
    assert re.search(
        rf"labfleet: host {third.name}: cannot pull {peer.name}:/srv/nowhere \(rsync exit [1-9]\d*\): .+; "
        rf"check lan_address / lan_ssh_port of {peer.name} and that {third.name} reaches it",
        first.stderr,
    ), first.stderr_tail()
    assert host_digests(puller, f"{ROOT}/ref") == local_digests(source), "the healthy pull did not complete"

    # The peer loses rrsync, and the third host's rsync is gone although its package stays.
    host_exec(peer, "mv /usr/bin/rrsync /usr/bin/rrsync.away")
    host_exec(third, "mv /usr/bin/rsync /usr/bin/rsync.away")
    host_data[peer.name]["datasets"] = {"ref": f"local:{source}"}
    host_data[third.name]["datasets"] = {"own": f"local:{own}"}
    second = pyinfra_run(hosts, deploy=deploy, host_data=host_data, expect_fail=True)
    assert {name for name, _ in second.errors()} == {host.name for host in hosts}, second.stderr_tail()
    assert (
        f"labfleet: host {peer.name}: rrsync is missing, so peers cannot pull datasets from it; it comes with "
        "rsync 3.2.4 and later (/usr/bin/rrsync); upgrade rsync"
    ) in second.stderr
    assert (
        f"labfleet: host {puller.name}: the peer {peer.name} failed earlier in this run, so {ROOT}/ref was not "
        f"pulled; fix what stopped {peer.name} (its error is above) and run again"
    ) in second.stderr
    assert re.search(
        rf"labfleet: host {third.name}: push {re.escape(str(own))} -> {ROOT}/own failed \(rsync exit [1-9]\d*\): .+; "
        "check that rsync is installed on both sides and that the SSH settings of this host work, then run again",
        second.stderr,
    ), second.stderr_tail()
    for line in second.stderr.splitlines():
        assert "Traceback" not in line and "AttributeError" not in line, second.stderr_tail()

    host_exec(peer, "mv /usr/bin/rrsync.away /usr/bin/rrsync")
    host_exec(third, "mv /usr/bin/rsync.away /usr/bin/rsync")
    assert_converged(pyinfra_run(hosts, deploy=deploy, host_data=host_data))
    assert host_digests(third, f"{ROOT}/own") == local_digests(own)
    assert_no_changes(pyinfra_run(hosts, deploy=deploy, host_data=host_data))
