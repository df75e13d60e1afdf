"""Replacing a PC (labfleet/migrate.py) on two real hosts: the old PC pc03 and the new PC pc09.

One story on one pair of hosts, so CI pays for one bring-up:

1. the old PC runs alice's JupyterLab (alice is UID 1001 there); her workspace and home hold
   nested files, hidden files, names with spaces and non-ASCII characters, a 50 MB file and a
   symlink;
2. the new PC (where alice is UID 1002) migrates from it: every checksum matches, every file
   belongs to 1002, the old PC is unchanged, JupyterLab does not start on the new PC yet, and
   the next run changes nothing;
3. a file that is newer on the new PC is kept, and one edited on the old PC arrives;
4. the old PC unreachable from the new one fails the new PC alone, with one line, and so does
   the old PC down altogether; the next run completes;
5. migrate_final: while a kernel runs on the old PC the cut-over waits and the new PC fails,
   saying why; forced, the old container is stopped (not removed), a last edit arrives, JupyterLab
   comes up on the new PC, the status shows the old project as migrated, and the next run
   (the old PC's deploy included) changes nothing and starts nothing again.
"""

from __future__ import annotations

import json
import re

import pytest

from .harness.engine import docker
from .harness.hosts import host_exec
from .harness.runner import assert_converged, assert_no_changes, run_pyinfra
from .harness.snapshots import checksum_snapshot
from .probes import bridge_ip, health

WORKSPACE = "/srv/workspace/alice"
HOME = "/srv/home/alice"
CONTAINER = "labfleet-alice-jupyterlab-1"
STEP = "Migrate users' files from the old PC"
PULL = f"{STEP} | Pull the workspace and home of alice from the old PC"
SUDOERS = "/etc/sudoers.d/labfleet-migrate"
RRSYNC = "/usr/bin/rrsync"
RUNTIME = "/.local/share/jupyter/runtime/"

# Written as alice's files on the old PC (bash, so that the names stay exactly as written).
FILES = f"""\
set -eu
cd {WORKSPACE}
mkdir -p "project/data/deep/er" .hidden "données" "with space"
echo nested > project/data/deep/er/leaf.txt
echo hidden > .hidden/config
echo "a file with spaces" > "with space/my notes.txt"
echo "résumé" > "données/résumé é.txt"
echo "日本語" > "日本語.txt"
head -c 50M /dev/urandom > big.bin
echo later > edited-later.txt
echo keep-mine > newer-on-new.txt
ln -s project/data/deep/er/leaf.txt latest
cd {HOME}
mkdir -p .ssh .config/app "notes dir"
echo key > .ssh/id_ed25519 && chmod 600 .ssh/id_ed25519 && chmod 700 .ssh
echo '{{"theme": "dark"}}' > .config/app/settings.json
echo "über" > "notes dir/ünïcode.md"
ln -s .config/app/settings.json settings-link
chown -R alice:alice {WORKSPACE} {HOME}
"""


def _relative(snapshot: dict, root: str) -> dict:
    """path under root -> (sha256, mode), without the JupyterLab server's per-process files."""
    return {
        path.removeprefix(root): (state.sha256, state.mode)
        for path, state in snapshot.items()
        if path.startswith(root + "/") and RUNTIME not in path
    }


def _tree(host, root: str) -> dict:
    return _relative(checksum_snapshot(host, [root]), root)


def _container_state(host) -> str:
    found = host_exec(host, f"docker inspect --format '{{{{.State.Status}}}}' {CONTAINER}", check=False)
    return found.stdout.strip() if found.returncode == 0 else "absent"


@pytest.fixture
def pair(make_hosts):
    old, new = make_hosts(2, engine=True)
    host_exec(old, "useradd --create-home --uid 1001 alice")
    host_exec(new, "useradd --create-home --uid 1002 alice")
    return old, new


def test_a_new_pc_takes_the_users_files_from_the_old_one_then_cuts_over(pair, lab_data, tmp_path):
    old, new = pair
    data = {**lab_data, "jupyter_users": ["alice"]}
    lan = {host.name: {"lan_address": bridge_ip(host), "lan_ssh_port": 22} for host in pair}
    moving = {**lan, new.name: {**lan[new.name], "migrate_from": old.name}}
    final = {**lan, new.name: {**moving[new.name], "migrate_final": True}}

    def run(host_data, hosts=pair, **kwargs):
        return run_pyinfra(hosts, data=data, host_data={h.name: host_data[h.name] for h in hosts}, **kwargs)

    # 1. The old PC, on its own, with alice's work.
    assert_converged(run(lan, hosts=[old]))
    assert health(old, "alice") == "healthy"
    host_exec(old, "bash -s", input=FILES)
    before = {root: _tree(old, root) for root in (WORKSPACE, HOME)}
    assert len(before[WORKSPACE]) >= 8 and len(before[HOME]) >= 3, before

    # 2. The new PC migrates; JupyterLab waits for the cut-over there.
    first = run(moving)
    assert_converged(first)
    assert first.status(new, PULL) == "success"
    for root in (WORKSPACE, HOME):
        assert _tree(new, root) == before[root], f"{new.name}: {root} differs from the old PC's"
        assert _tree(old, root) == before[root], f"{old.name}: the migration changed {root}"
        strangers = host_exec(new, f"find {root} ! -uid 1002 ! -gid 1002").stdout.split("\n")
        assert strangers == [""], f"{new.name}: not alice's (1002) there: {strangers}"
    assert host_exec(new, f"readlink {WORKSPACE}/latest {HOME}/settings-link").stdout.split() == [
        "project/data/deep/er/leaf.txt",
        ".config/app/settings.json",
    ]
    assert host_exec(new, f"stat -c %a {HOME}/.ssh {HOME}/.ssh/id_ed25519").stdout.split() == ["700", "600"]
    assert _container_state(new) == "absent", "JupyterLab started on the new PC before the cut-over"
    assert health(old, "alice") == "healthy"
    assert_no_changes(run(moving))

    # 3. A file newer on the new PC is kept; a file edited on the old PC arrives.
    host_exec(
        new, f"echo mine > {WORKSPACE}/newer-on-new.txt && touch -d '2026-01-01 11:00' {WORKSPACE}/newer-on-new.txt"
    )
    host_exec(new, f"chown alice:alice {WORKSPACE}/newer-on-new.txt")
    host_exec(
        old, f"echo theirs > {WORKSPACE}/newer-on-new.txt && touch -d '2026-01-01 10:00' {WORKSPACE}/newer-on-new.txt"
    )
    host_exec(old, f"echo edited > {WORKSPACE}/edited-later.txt")

    # 4. The old PC cannot be reached from the new one: the new PC fails alone, with one line.
    host_exec(new, f"ip route add unreachable {lan[old.name]['lan_address']}")
    cut_off = run(moving, expect_fail=True)
    # The new PC stops at the pull (what follows on it is not run); the old PC is fine.
    assert {name for name, _ in cut_off.errors()} == {new.name}, cut_off.stderr_tail()
    assert (new.name, PULL) in cut_off.errors()
    assert re.search(
        rf"labfleet: host {new.name}: cannot pull alice's (workspace|home) {old.name}:/srv/\w+/alice "
        rf"\(rsync exit \d+\): .+; check that {old.name} is up and that {new.name} reaches it "
        rf"\(lan_address / lan_ssh_port of {old.name}\), then run again",
        cut_off.stderr,
    ), cut_off.stderr_tail()
    assert "Traceback" not in cut_off.stderr
    host_exec(new, f"ip route del unreachable {lan[old.name]['lan_address']}")
    # The old PC down altogether (frozen: nothing answers): the controller cannot reach it either.
    docker("pause", old.container)
    try:
        down = run(moving, expect_fail=True)
    finally:
        docker("unpause", old.container)
    assert (new.name, PULL) in down.errors(), down.stderr_tail()
    assert (
        f"labfleet: host {new.name}: cannot migrate alice from {old.name}: {old.name} failed earlier in this run "
        "(its error is above); fix what stopped it and run again"
    ) in down.stderr, down.stderr_tail()
    again = run(moving)
    assert_converged(again)
    assert host_exec(new, f"cat {WORKSPACE}/edited-later.txt {WORKSPACE}/newer-on-new.txt").stdout.split() == [
        "edited",
        "mine",
    ]
    assert_no_changes(run(moving))

    # 5. The cut-over: a last edit on the old PC, then migrate_final. A kernel runs there, so the
    # cut-over waits (the new PC fails and says why) until it is forced.
    host_exec(old, f"echo last > {HOME}/last-minute.txt && chown alice:alice {HOME}/last-minute.txt")
    kernel = host_exec(
        old,
        'curl -sf -X POST -H "Authorization: token $(cat /opt/labfleet/alice/jupyter_token)" '
        "http://127.0.0.1:8888/api/kernels",
    )
    assert '"id"' in kernel.stdout, kernel
    refused = run(final, expect_fail=True)
    assert {name for name, _ in refused.errors()} == {new.name}, refused.stderr_tail()
    assert re.search(
        rf"labfleet: host {new.name}: the cut-over of alice from {old.name} did not happen: its JupyterLab there "
        rf"is busy \(kernel \w+ \(python3\) .+\); nothing was moved, and JupyterLab of alice stays on "
        rf"{old.name}; run again once it is idle, or stop it now with --data jupyter_update=now",
        refused.stderr,
    ), refused.stderr_tail()
    assert f"the cut-over of alice to {new.name} waits: kernel" in refused.stderr
    assert _container_state(old) == "running" and _container_state(new) == "absent"
    assert host_exec(new, f"test -e {HOME}/last-minute.txt", check=False).returncode != 0

    old_before_final = {root: _tree(old, root) for root in (WORKSPACE, HOME)}
    final[new.name]["jupyter_update"] = "now"
    cut = run(final)
    assert_converged(cut)
    assert cut.status(old, f"{STEP} | Stop JupyterLab of alice for the cut-over") == "success"
    assert cut.status(new, PULL) == "success"
    assert _container_state(old) == "exited", "the old container was removed, or is still running"
    assert host_exec(old, "cut -d' ' -f1 /opt/labfleet/alice/migrated-to").stdout.strip() == new.name
    assert host_exec(new, f"cat {HOME}/last-minute.txt && stat -c %u {HOME}/last-minute.txt").stdout.split() == [
        "last",
        "1002",
    ]
    assert health(new, "alice") == "healthy"
    for root in (WORKSPACE, HOME):
        # The kernel's own IPython history may be written as the container stops.
        kept = {path: state for path, state in old_before_final[root].items() if "/.ipython/" not in path}
        after = {path: state for path, state in _tree(old, root).items() if "/.ipython/" not in path}
        assert after == kept, f"{old.name}: the cut-over changed {root}"

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABFLEET_STATUS_FORMAT", "json")
        status = run(final, deploy="status.py")
    document, _ = json.JSONDecoder().raw_decode(status.stdout.lstrip())
    rows = {row["host"]: row for row in document["hosts"]}
    (user,) = rows[old.name]["users"]
    assert user["moved"] == f"migrated to {new.name}", user
    assert not [why for why in rows[old.name]["drift"] if "alice" in why], rows[old.name]["drift"]

    # The next run, the old PC's deploy included, changes nothing and starts nothing again.
    assert_no_changes(run(final))
    assert _container_state(old) == "exited"

    # The sync account may run exactly the two read-only rrsyncs as alice, nothing else; once
    # migrate_from is gone from the new PC (the admin's last step), the rule goes too.
    assert host_exec(old, f"stat -c '%U %a' {SUDOERS}").stdout.strip() == "root 440"
    rules = [line for line in host_exec(old, f"cat {SUDOERS}").stdout.splitlines() if not line.startswith("#")]
    assert rules == [
        'Defaults:labfleet-sync env_keep += "SSH_ORIGINAL_COMMAND"',
        f"labfleet-sync ALL=(alice) NOPASSWD: {RRSYNC} -ro {WORKSPACE}, {RRSYNC} -ro {HOME}",
    ]
    done = run(lan)
    assert_converged(done)
    assert done.status(old, f"{STEP} | Remove the migration sudo rules") == "success"
    assert host_exec(old, f"test -e {SUDOERS}", check=False).returncode != 0
    assert _container_state(old) == "exited" and health(new, "alice") == "healthy"
    assert_no_changes(run(lan))
