"""Migrating a user's files between two hosts against plain rsync of the same tree, and a no-change run.

    ./run bench migrate [--files 2000] [--total-mb 1024] [--repeat 3]

Starts 2 test hosts (tests/e2e/harness, so it needs root and Docker like the e2e tests): the
old PC, where alice (UID 1001) has a workspace of --files files holding --total-mb MB in all,
in nested directories, and the new PC, where alice is UID 1002 and migrate_from names the old
one. It times, alternating, in the same run:

- labfleet cold: ``pyinfra -y <inventory> bench/deploys/migrate_step.py`` on both hosts with
  the new PC's workspace emptied first (its keys, the old PC's sudo rule and authorized key
  are in place from an untimed first run), so the whole tree moves;
- the floor, cold: plain ``rsync -a`` of the same tree, run on the new PC, pulling from the
  old one over SSH (``sudo rsync`` there), into an empty directory;
- labfleet no change: the same deploy again, with nothing to move;
- the floor deploy: ``bench/deploys/floor.py`` (one ``server.shell("true")``) on both hosts.

Prints medians and the ratios; goals are at most 1.2x (cold) and what the no-change run costs
over the floor. It asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from tests.e2e.harness.engine import ensure_engine
from tests.e2e.harness.hosts import Fleet, generate_keypair, host_exec
from tests.e2e.harness.runner import REPO_ROOT, assert_converged, assert_no_changes, run_pyinfra
from tests.e2e.probes import bridge_ip

BENCH = Path(__file__).resolve().parent
DEPLOY = BENCH / "deploys" / "migrate_step.py"
FLOOR_DEPLOY = BENCH / "deploys" / "floor.py"
WORKSPACE = "/srv/workspace/alice"
HOME = "/srv/home/alice"
FLOOR_DIR = "/srv/bench-floor"
GOAL_COLD = 1.2


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _make_tree(host, files: int, total_mb: int) -> None:
    """files files of equal size in 20 x 10 nested directories, owned by alice."""
    size_kib = max(1, total_mb * 1024 // files)
    script = (
        f"set -e; cd {WORKSPACE}; i=0; while [ $i -lt {files} ]; do "
        'd="d$((i % 20))/s$((i % 10))"; mkdir -p "$d"; '
        f'head -c {size_kib}K /dev/urandom > "$d/f$i.bin"; i=$((i + 1)); done; '
        f"chown -R alice:alice {WORKSPACE}"
    )
    host_exec(host, script, timeout=1800)


def _floor_key(old, new) -> str:
    """A key on the new PC that the old PC's sudo-capable SSH user accepts: plain rsync's way in."""
    host_exec(new, "test -f /root/.ssh/bench || ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/bench")
    public = host_exec(new, "cat /root/.ssh/bench.pub").stdout
    host_exec(old, f"cat >> /home/{old.ssh_user}/.ssh/authorized_keys", input=public)
    return (
        f"rsync -a -e 'ssh -i /root/.ssh/bench -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null' "
        f"--rsync-path 'sudo rsync' {old.ssh_user}@{bridge_ip(old)}:{WORKSPACE}/ {FLOOR_DIR}/"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--total-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    ensure_engine()
    names = ("labfleet cold", "floor cold", "labfleet noop", "floor deploy")
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as scratch_dir:
        fleet = Fleet(generate_keypair(Path(scratch_dir) / "ssh"))
        try:
            old, new = hosts = fleet.start_hosts(2)
            for host, uid in ((old, 1001), (new, 1002)):
                host_exec(host, f"useradd --create-home --uid {uid} alice")
                host_exec(host, f"install -d -o alice -g alice -m 750 {WORKSPACE} && install -d -o alice -m 700 {HOME}")
            lan = {host.name: {"lan_address": bridge_ip(host), "lan_ssh_port": 22} for host in hosts}
            host_data = {**lan, new.name: {**lan[new.name], "migrate_from": old.name}}
            data = {"jupyter_users": ["alice"], "extra_ca_certificates": []}
            _make_tree(old, args.files, args.total_mb)
            size = int(host_exec(old, f"du -sb {WORKSPACE} | cut -f1").stdout)

            def deploy(noop: bool) -> None:
                result = run_pyinfra(hosts, deploy=DEPLOY, data=data, host_data=host_data, cwd=REPO_ROOT)
                (assert_no_changes if noop else assert_converged)(result)

            # Untimed: packages, accounts, keys, the sudo rule and a first pull.
            deploy(noop=False)
            floor = _floor_key(old, new)
            host_exec(new, f"install -d {FLOOR_DIR} && {floor}", timeout=1800)
            for _ in range(args.repeat):
                host_exec(new, f"find {WORKSPACE} -mindepth 1 -delete")
                times["labfleet cold"].append(_timed(lambda: deploy(noop=False)))
                host_exec(new, f"rm -rf {FLOOR_DIR} && install -d {FLOOR_DIR}")
                times["floor cold"].append(_timed(lambda: host_exec(new, floor, timeout=1800)))
                times["labfleet noop"].append(_timed(lambda: deploy(noop=True)))
                times["floor deploy"].append(
                    _timed(lambda: run_pyinfra(hosts, deploy=FLOOR_DEPLOY, data=data, host_data=host_data))
                )
        finally:
            fleet.remove_all()

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"tree: {args.files} files, {size / 2**20:.0f} MiB, 2 hosts, {args.repeat} alternating rounds")
    for name, values in times.items():
        print(f"  {name:14s} median {median[name]:6.2f} s   ({', '.join(f'{v:.2f}' for v in values)})")
    cold = median["labfleet cold"] / median["floor cold"]
    verdict = "meets" if cold <= GOAL_COLD else "misses"
    print(f"  migration: {cold:.2f}x plain rsync ({verdict} the goal of {GOAL_COLD}x)")
    print(f"  no change: {median['labfleet noop'] / median['floor deploy']:.2f}x the floor deploy")


if __name__ == "__main__":
    main()
