"""How much a no-change re-run of the docker step costs over the cost of reaching the hosts.

    ./run bench docker_noop [--hosts 3] [--repetitions 5]

Starts test hosts with the e2e harness (tests/e2e/harness: root and Docker needed),
installs Docker Engine on them once (docker_source = "distro", from the hosts' archive),
then alternates, on the same hosts, in the same run:

- floor:          bench/deploys/floor.py, one ``server.shell("true")``
- docker:         bench/deploys/docker_only.py, the docker step alone
- preflight+docker: bench/deploys/docker_step.py

and prints the medians and each deploy's ratio to the floor (goal for the docker step:
1.5x or less). Every timed re-run must report zero changes, or the benchmark stops.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.e2e.harness.engine import ensure_engine
from tests.e2e.harness.hosts import Fleet, generate_keypair
from tests.e2e.harness.runner import assert_converged, assert_no_changes, run_pyinfra

BENCH = Path(__file__).resolve().parent
DEPLOYS = {
    "floor": BENCH / "deploys" / "floor.py",
    "docker": BENCH / "deploys" / "docker_only.py",
    "preflight+docker": BENCH / "deploys" / "docker_step.py",
}
DATA = {"docker_source": "distro", "extra_ca_certificates": []}


def timed_run(hosts, deploy: Path) -> float:
    started = time.monotonic()
    result = run_pyinfra(hosts, deploy=deploy, data=DATA)
    elapsed = time.monotonic() - started
    if deploy == DEPLOYS["floor"]:
        assert_converged(result)
    else:
        assert_no_changes(result)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=5, help="rounds of the alternation (at least 3)")
    args = parser.parse_args(argv)
    if args.repetitions < 3:
        parser.error("--repetitions must be at least 3")

    ensure_engine()
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as scratch:
        fleet = Fleet(generate_keypair(Path(scratch)))
        try:
            hosts = fleet.start_hosts(args.hosts)
            print(f"{len(hosts)} test hosts up; installing Docker Engine once", file=sys.stderr)
            assert_converged(run_pyinfra(hosts, deploy=DEPLOYS["preflight+docker"], data=DATA))
            times: dict[str, list[float]] = {name: [] for name in DEPLOYS}
            for _ in range(args.repetitions):
                for name, deploy in DEPLOYS.items():
                    times[name].append(timed_run(hosts, deploy))
        finally:
            fleet.remove_all()

    floor = statistics.median(times["floor"])
    print(f"no-change re-run on {args.hosts} hosts, median of {args.repetitions} alternating runs:")
    for name, samples in times.items():
        median = statistics.median(samples)
        runs = " ".join(f"{sample:.2f}" for sample in samples)
        print(f"  {name:<17} {median:6.2f} s  {median / floor:5.2f}x floor   (runs: {runs})")
    ratio = statistics.median(times["docker"]) / floor
    print(f"docker step / floor = {ratio:.2f}x (goal <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
