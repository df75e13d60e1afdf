"""The whole deploy against its floor: no-change re-runs, fresh provisions, round trips, memory.

    ./run bench                 # 1, 3, 6, 10 hosts; 3 alternating rounds (about 20 min)
    ./run bench --quick         # 1 and 3 hosts; fewer rounds (about 8 min)
    ./run bench --baseline-tree ../before   # also time another checkout's deploy.py

Needs what the end-to-end tests need (root and Docker; see tests/README.md). It starts
trixie test hosts with the distribution's Docker Engine preinstalled (the harness's
engine=True flavour) and deploys them with the end-to-end tests' whole-deploy settings:
docker_source distro, the `jupyter` image profile on the harness's Debian base, shipped
from this machine, gpu false. Everything it sends goes to 127.0.0.1 and its own hosts.

What it measures, with medians of alternating rounds:

- no change: ``deploy.py`` re-run on hosts it has already converged, against the floor,
  ``bench/deploys/floor.py`` (one ``server.shell("true")``) on the same hosts, at each size;
- fresh provision: ``deploy.py`` on new hosts, from an engine-only host to healthy
  JupyterLab; the engine is preinstalled so that installing Docker from the archive does
  not dominate (``--bare-provision`` adds one timing on bare hosts);
- round trips: the commands pyinfra runs per host in a no-change run, counted from its
  ``--debug`` log (one line per command), in an extra, untimed run;
- controller memory: the peak RSS of the pyinfra process (``wait4``), per run.

It checks that the report's modules import before it measures, saves the raw figures to
bench/results.json as soon as the measuring ends, then writes bench/RESULTS.md and
bench/results.png (bench/report.py). It asserts nothing about time: a run that changes
something, or fails, stops the benchmark.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench import measurements
from bench.dependencies import REPORT_MODULES, require
from bench.measurements import Measurements
from bench.report import write_report
from tests.e2e.harness.engine import ensure_engine
from tests.e2e.harness.hosts import MAX_HOSTS_PER_CALL, Fleet, TestHost, generate_keypair
from tests.e2e.harness.images import base_image
from tests.e2e.harness.runner import Result, assert_converged, assert_no_changes, write_inventory

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent

FLOOR = BENCH / "deploys" / "floor.py"
DEPLOY = "deploy.py"
RUN_TIMEOUT_S = 1800
_COMMAND_LINE = re.compile(r"Running command on (\S+): ")
_UPLOAD_LINE = re.compile(r"\[pyinfra\.connectors\.ssh\] Attempting upload")


@dataclass
class Run:
    """One timed pyinfra run: wall seconds, the controller's peak RSS and CPU time, the parsed result."""

    seconds: float
    max_rss_kb: int
    result: Result
    cpu_seconds: float = 0.0


def lab_data() -> dict:
    """The end-to-end tests' whole-deploy settings (tests/e2e/conftest.py `lab_data`)."""
    return {
        "docker_source": "distro",
        "image_profile": "jupyter",
        "image_delivery": "ship",
        "base_image": base_image("trixie"),
        "gpu": False,
    }


def pyinfra_command() -> list[str]:
    sibling = Path(sys.executable).parent / "pyinfra"
    return [str(sibling)] if sibling.exists() else [sys.executable, "-m", "pyinfra"]


def run_deploy(
    hosts: list[TestHost], deploy: str | Path, data: dict, cwd: Path = REPO_ROOT, debug=False, groups=None
) -> Run:
    """`pyinfra -y --json` on hosts, timed, with the controller's peak memory from wait4."""
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-run-") as workdir:
        inventory = write_inventory(Path(workdir), hosts, data, groups=groups)
        argv = [*pyinfra_command(), "-y", "--json", *(["--debug"] if debug else []), str(inventory), str(deploy)]
        out, err = Path(workdir) / "stdout", Path(workdir) / "stderr"
        with out.open("w") as stdout, err.open("w") as stderr:
            started = time.monotonic()
            process = subprocess.Popen(argv, cwd=cwd, stdout=stdout, stderr=stderr)
            deadline = started + RUN_TIMEOUT_S
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    process.kill()
                    raise SystemExit(f"pyinfra ran past {RUN_TIMEOUT_S} s: {' '.join(argv)}")
                time.sleep(0.005)
            seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout_text, stderr_text = out.read_text(), err.read_text()
    parsed = _parse_json(stdout_text)
    result = Result(rc=process.returncode, stdout=stdout_text, stderr=stderr_text, json=parsed, command=argv)
    return Run(seconds, usage.ru_maxrss, result, usage.ru_utime + usage.ru_stime)


def _parse_json(stdout: str) -> dict | None:
    start = stdout.find("{")
    while start != -1:
        try:
            return json.loads(stdout[start:])
        except ValueError:
            start = stdout.find("\n{", start + 1)
            start = start + 1 if start != -1 else -1
    return None


def count_round_trips(stderr: str, hosts: list[TestHost]) -> tuple[float, dict[str, int]]:
    """Commands (and uploads) per host from a --debug log; and, for the first host, what they were."""
    per_host: collections.Counter[str] = collections.Counter()
    first: collections.Counter[str] = collections.Counter()
    for line in stderr.splitlines():
        match = _COMMAND_LINE.search(line)
        if match:
            per_host[match.group(1)] += 1
            if match.group(1) == hosts[0].name:
                first[_command_head(line[match.end() :])] += 1
        elif _UPLOAD_LINE.search(line):
            per_host["uploads"] += 1
    uploads = per_host.pop("uploads", 0)
    total = sum(per_host[host.name] for host in hosts) + uploads
    return total / len(hosts), dict(first.most_common())


def _command_head(command: str) -> str:
    """A short, stable label for a command: what follows sudo's `sh -c '`, first 60 characters."""
    command = command.split(") ", 1)[-1]
    command = command.split("sh -c '", 1)[-1]
    return command[:60]


def start_hosts(fleet: Fleet, n: int, engine: bool = True) -> list[TestHost]:
    """n test hosts, started MAX_HOSTS_PER_CALL at a time (the harness's limit per call)."""
    hosts: list[TestHost] = []
    while len(hosts) < n:
        hosts += fleet.start_hosts(min(MAX_HOSTS_PER_CALL, n - len(hosts)), engine=engine)
    return hosts


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_no_change(fleet: Fleet, args, data: dict, found: Measurements) -> None:
    hosts = start_hosts(fleet, max(args.sizes))
    log(f"{len(hosts)} engine hosts up; converging them once (untimed)")
    assert_converged(run_deploy(hosts, DEPLOY, data).result)
    trees = {"deploy": REPO_ROOT}
    if args.baseline_tree:
        trees["baseline"] = args.baseline_tree.resolve()
        # Untimed: the baseline's own controller-side cache (its build/ directory).
        assert_no_changes(run_deploy(hosts[:1], DEPLOY, data, cwd=trees["baseline"]).result)
    names = [*trees, "floor"]
    for size in args.sizes:
        found.no_change[size] = {name: [] for name in names}
        found.memory_kb[size] = {name: [] for name in names}
        found.cpu_s[size] = {name: [] for name in names}
    for round_ in range(args.repetitions):
        for size in args.sizes:
            subset = hosts[:size]
            # Alternate which goes first, so neither always runs on a warmer machine.
            for name in names if round_ % 2 == 0 else reversed(names):
                if name == "floor":
                    run = run_deploy(subset, FLOOR, data)
                    assert_converged(run.result)
                else:
                    run = run_deploy(subset, DEPLOY, data, cwd=trees[name])
                    assert_no_changes(run.result)
                found.no_change[size][name].append(run.seconds)
                found.memory_kb[size][name].append(run.max_rss_kb)
                found.cpu_s[size][name].append(run.cpu_seconds)
            log(
                f"round {round_ + 1}, {size} host(s): "
                + ", ".join(f"{name} {found.no_change[size][name][-1]:.2f} s" for name in names)
            )
    for size in args.sizes:
        found.round_trips[size] = {}
        for name in names:
            deploy, cwd = (FLOOR, REPO_ROOT) if name == "floor" else (DEPLOY, trees[name])
            run = run_deploy(hosts[:size], deploy, data, cwd=cwd, debug=True)
            assert_converged(run.result)
            per_host, commands = count_round_trips(run.result.stderr, hosts[:size])
            found.round_trips[size][name] = per_host
            if size == args.sizes[0]:
                found.round_trip_commands[name] = commands
    fleet.remove(hosts)


def measure_provision(fleet: Fleet, args, data: dict, found: Measurements) -> None:
    for size in args.provision_sizes:
        found.provision[size] = []
    for round_ in range(args.provision_repetitions):
        for size in args.provision_sizes if round_ % 2 == 0 else reversed(args.provision_sizes):
            hosts = start_hosts(fleet, size)
            try:
                run = run_deploy(hosts, DEPLOY, data)
                assert_converged(run.result)
                found.provision[size].append(run.seconds)
                log(f"provision round {round_ + 1}, {size} host(s): {run.seconds:.1f} s")
            finally:
                fleet.remove(hosts)
    if args.bare_provision:
        hosts = start_hosts(fleet, 1, engine=False)
        try:
            run = run_deploy(hosts, DEPLOY, data)
            assert_converged(run.result)
            found.bare_provision[1] = [run.seconds]
            log(f"bare provision, 1 host: {run.seconds:.1f} s")
        finally:
            fleet.remove(hosts)


def machine() -> dict:
    meminfo = Path("/proc/meminfo").read_text()
    total = re.search(r"MemTotal:\s+(\d+)", meminfo)
    mem_kb = int(total.group(1)) if total else 0
    docker = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, check=False
    ).stdout.strip()
    pyinfra = subprocess.run([*pyinfra_command(), "--version"], capture_output=True, text=True, check=False)
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "docker": docker or "unknown",
        "python": platform.python_version(),
        "pyinfra": pyinfra.stdout.strip().split()[-1] if pyinfra.stdout.strip() else "unknown",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 3 hosts, one provision round")
    parser.add_argument("--sizes", type=int, nargs="+", help="no-change fleet sizes (default 1 3 6 10)")
    parser.add_argument("--provision-sizes", type=int, nargs="*", help="fresh provision sizes (default 1 3 6)")
    parser.add_argument("--repetitions", type=int, help="alternating rounds of no-change runs (default 3)")
    parser.add_argument("--provision-repetitions", type=int, help="rounds of fresh provisions (default 3)")
    parser.add_argument("--bare-provision", action="store_true", help="also provision one bare host (no engine)")
    parser.add_argument("--baseline-tree", type=Path, help="another checkout whose deploy.py is timed alongside")
    parser.add_argument("--baseline-label", default="before", help="the baseline's name in the report")
    parser.add_argument("--output", type=Path, default=BENCH, help="where RESULTS.md, results.png/json go")
    args = parser.parse_args(argv)
    quick = args.quick
    args.sizes = sorted(args.sizes or ([1, 3] if quick else [1, 3, 6, 10]))
    args.provision_sizes = sorted(args.provision_sizes if args.provision_sizes is not None else [1, 3, 6])
    if quick and args.provision_sizes == [1, 3, 6]:
        args.provision_sizes = [1, 3]
    args.repetitions = args.repetitions or 3
    args.provision_repetitions = args.provision_repetitions or (1 if quick else 3)
    if args.repetitions < 3 and not quick:
        parser.error("--repetitions must be at least 3 (medians of alternating rounds)")
    if max(args.sizes + args.provision_sizes) > 20:
        parser.error("at most 20 hosts")

    require(REPORT_MODULES)  # now, not after twenty minutes of measuring
    ensure_engine()
    data = lab_data()
    found = Measurements()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as scratch:
        fleet = Fleet(generate_keypair(Path(scratch) / "ssh"))
        try:
            measure_no_change(fleet, args, data, found)
            if args.provision_sizes:
                measure_provision(fleet, args, data, found)
        finally:
            fleet.remove_all()
    info = machine()
    info["bench_minutes"] = round((time.monotonic() - started) / 60, 1)
    info["repetitions"] = args.repetitions
    info["provision_repetitions"] = args.provision_repetitions
    info["baseline"] = args.baseline_label if args.baseline_tree else None
    saved = measurements.save(found, info, args.output)
    log(f"raw figures saved to {saved}")
    write_report(found, info, args.output)
    print((args.output / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
