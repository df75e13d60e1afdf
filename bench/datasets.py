"""How much the datasets step costs over plain rsync: a cold push to 3 hosts, and a no-change run.

    ./run bench datasets [--files 300] [--big-mb 50] [--repeat 3]

Starts 3 test hosts (tests/e2e/harness, so it needs root and Docker like the e2e tests),
generates a dataset on the controller, and times, in the same run:

- labfleet: `pyinfra -y <inventory> <datasets-only deploy>` pushing the dataset to all 3
  hosts (cold: the dataset directories are emptied before each repeat), then the same run
  again with nothing to do;
- the floor: `rsync -a` of the same data to the same 3 hosts, in parallel (as pyinfra runs
  hosts), over the same SSH options, cold and then with nothing to do.

Prints medians and the ratios; goals are at most 1.2x (cold) and 1.5x (no change). It
asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from labfleet.datasets import push_command
from tests.e2e.harness.engine import ensure_engine
from tests.e2e.harness.hosts import Fleet, generate_keypair, host_exec
from tests.e2e.harness.runner import assert_converged, assert_no_changes, run_pyinfra, write_inventory
from tests.e2e.test_datasets import DEPLOY, make_dataset

GOALS = {"cold push": 1.2, "no-change": 1.5}
FLOOR_DIR = "/srv/bench-floor"


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _floor_rsync(hosts, inventory_dir: Path, source: Path) -> None:
    """Plain rsync -a to every host at once, over the SSH options pyinfra uses for it."""
    processes = []
    for host in hosts:
        data = {
            "ssh_hostname": "127.0.0.1",
            "ssh_port": host.ssh_port,
            "ssh_user": host.ssh_user,
            "ssh_key": host.ssh_key,
            "ssh_known_hosts_file": str(inventory_dir / "known_hosts"),
            "ssh_strict_host_key_checking": "off",
        }
        argv = push_command(data, host.name, str(source), FLOOR_DIR, ["-a"], sudo=True)
        processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        if process.returncode != 0:
            raise SystemExit(f"floor rsync failed: {stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--big-mb", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    ensure_engine()
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        fleet = Fleet(generate_keypair(scratch / "ssh"))
        try:
            hosts = fleet.start_hosts(3)
            source = make_dataset(scratch / "bench", files=args.files, big_mb=args.big_mb)
            size = sum(path.stat().st_size for path in source.rglob("*") if path.is_file())
            deploy = scratch / "datasets_deploy.py"
            deploy.write_text(DEPLOY.replace("preflight.check_host(settings)\n", ""))
            data = {"datasets": {"bench": f"local:{source}"}, "extra_ca_certificates": []}
            inventory_dir = scratch / "inventory"
            inventory_dir.mkdir()
            write_inventory(inventory_dir, hosts, data)

            # Untimed: packages (rsync, acl), group, layout, so both sides start from the same host state.
            empty = scratch / "empty"
            empty.mkdir()
            assert_converged(run_pyinfra(hosts, deploy=deploy, data={**data, "datasets": {"bench": f"local:{empty}"}}))

            def empty_targets() -> None:
                for host in hosts:
                    host_exec(host, f"rm -rf {FLOOR_DIR} /srv/datasets/bench/* && mkdir -p {FLOOR_DIR}")

            # pyinfra's own fixed cost (start, connect, disconnect), for reading the no-change ratio.
            empty_deploy = scratch / "empty_deploy.py"
            empty_deploy.write_text('"""No operations."""\n')
            names = ("labfleet cold", "floor cold", "labfleet noop", "floor noop", "pyinfra, no ops")
            times: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(args.repeat):
                empty_targets()
                times["labfleet cold"].append(
                    _timed(lambda: assert_converged(run_pyinfra(hosts, deploy=deploy, data=data)))
                )
                times["floor cold"].append(_timed(lambda: _floor_rsync(hosts, inventory_dir, source)))
                times["labfleet noop"].append(
                    _timed(lambda: assert_no_changes(run_pyinfra(hosts, deploy=deploy, data=data)))
                )
                times["floor noop"].append(_timed(lambda: _floor_rsync(hosts, inventory_dir, source)))
                times["pyinfra, no ops"].append(_timed(lambda: run_pyinfra(hosts, deploy=empty_deploy, data=data)))
        finally:
            fleet.remove_all()

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"dataset: {args.files} files + one of {args.big_mb} MB ({size / 1e6:.1f} MB), 3 hosts, {args.repeat} runs")
    for name, values in times.items():
        print(f"  {name:16s} median {median[name]:6.2f} s   ({', '.join(f'{v:.2f}' for v in values)})")
    for label, ours, floor in (
        ("cold push", "labfleet cold", "floor cold"),
        ("no-change", "labfleet noop", "floor noop"),
    ):
        ratio = median[ours] / median[floor]
        verdict = "meets" if ratio <= GOALS[label] else "misses"
        print(f"  {label}: {ratio:.2f}x the floor ({verdict} the goal of {GOALS[label]}x)")


if __name__ == "__main__":
    main()
