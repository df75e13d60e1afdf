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
- stand-in GPU hosts: the same no-change measure (against the floor, and round trips) on
  hosts made like tests/e2e/test_nvidia.py's, with the STAND-IN NVIDIA toolkit, a simulated
  driver and ``gpu: true``, deployed with ``bench/deploys/gpu_standin.py`` (deploy.py less
  its GPU check in the image, which needs a real GPU); ``--gpu-sizes``, 1 and 3 by default;
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
from tests.e2e import nvidia_standin
from tests.e2e.harness.engine import ensure_engine
from tests.e2e.harness.hosts import MAX_HOSTS_PER_CALL, Fleet, TestHost, generate_keypair
from tests.e2e.harness.images import base_image
from tests.e2e.harness.runner import Result, assert_converged, assert_no_changes, write_inventory

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent

FLOOR = BENCH / "deploys" / "floor.py"
GPU_DEPLOY = BENCH / "deploys" / "gpu_standin.py"
STANDIN_DRIVER = "570.86.15"  # at the driver floor (570) of the default CUDA line, 12.8
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


def time_rounds(
    hosts: list[TestHost], sizes: list[int], repetitions: int, deploys: dict, data: dict, times: dict, **extra: dict
) -> None:
    """Alternating rounds of no-change runs of each deploy (name -> (file, cwd)) at each size.

    Seconds go to times[size][name]; each of extra ("memory_kb", "cpu_s") to extra[key][size][name].
    """
    for size in sizes:
        times[size] = {name: [] for name in deploys}
        for table in extra.values():
            table[size] = {name: [] for name in deploys}
    for round_ in range(repetitions):
        for size in sizes:
            subset = hosts[:size]
            # Alternate which goes first, so neither always runs on a warmer machine.
            for name in deploys if round_ % 2 == 0 else reversed(deploys):
                deploy, cwd = deploys[name]
                run = run_deploy(subset, deploy, data, cwd=cwd)
                (assert_converged if deploy == FLOOR else assert_no_changes)(run.result)
                times[size][name].append(run.seconds)
                measured = {"memory_kb": run.max_rss_kb, "cpu_s": run.cpu_seconds}
                for key, table in extra.items():
                    table[size][name].append(measured[key])
            log(
                f"round {round_ + 1}, {size} host(s): "
                + ", ".join(f"{name} {times[size][name][-1]:.2f} s" for name in deploys)
            )


def round_trips_per_size(hosts: list[TestHost], sizes: list[int], deploys: dict, data: dict, trips: dict) -> dict:
    """trips[size][name]: round trips per host from an extra --debug run; returns, per deploy,
    what the first size's first host ran."""
    commands = {}
    for size in sizes:
        trips[size] = {}
        for name, (deploy, cwd) in deploys.items():
            run = run_deploy(hosts[:size], deploy, data, cwd=cwd, debug=True)
            assert_converged(run.result)
            trips[size][name], ran = count_round_trips(run.result.stderr, hosts[:size])
            if size == sizes[0]:
                commands[name] = ran
    return commands


def measure_no_change(fleet: Fleet, args, data: dict, found: Measurements) -> None:
    hosts = start_hosts(fleet, max(args.sizes))
    log(f"{len(hosts)} engine hosts up; converging them once (untimed)")
    assert_converged(run_deploy(hosts, DEPLOY, data).result)
    deploys: dict[str, tuple[str | Path, Path]] = {"deploy": (DEPLOY, REPO_ROOT)}
    if args.baseline_tree:
        deploys["baseline"] = (DEPLOY, args.baseline_tree.resolve())
        # Untimed: the baseline's own controller-side cache (its build/ directory).
        assert_no_changes(run_deploy(hosts[:1], DEPLOY, data, cwd=deploys["baseline"][1]).result)
    deploys["floor"] = (FLOOR, REPO_ROOT)
    extra = {"memory_kb": found.memory_kb, "cpu_s": found.cpu_s}
    time_rounds(hosts, args.sizes, args.repetitions, deploys, data, found.no_change, **extra)
    found.round_trip_commands = round_trips_per_size(hosts, args.sizes, deploys, data, found.round_trips)
    fleet.remove(hosts)


def gpu_standin_data(data: dict, mirror: str) -> dict:
    """The whole-deploy settings on a GPU host: gpu forced true, the toolkit from the host's stand-in repository."""
    return {**data, "gpu": True, "nvidia_toolkit_apt_mirror": mirror}


def make_gpu_standins(hosts: list[TestHost]) -> str:
    """Make hosts the e2e tests' stand-in GPU hosts (tests/e2e/test_nvidia.py); returns the mirror URL.

    Each host serves its own signed repository of stand-in toolkit packages on its 127.0.0.1,
    at the same URL, and shows a loaded driver at the floor for the default CUDA line.
    """
    mirror = ""
    for host in hosts:
        nvidia_standin.build_standin_repo(host)
        mirror = nvidia_standin.serve(host)
        nvidia_standin.simulate_driver(host, STANDIN_DRIVER)
    return mirror


def measure_gpu_standin(fleet: Fleet, args, data: dict, found: Measurements) -> None:
    hosts = start_hosts(fleet, max(args.gpu_sizes))
    gpu_data = gpu_standin_data(data, make_gpu_standins(hosts))
    log(f"{len(hosts)} stand-in GPU hosts up; converging them once (untimed)")
    assert_converged(run_deploy(hosts, GPU_DEPLOY, gpu_data).result)
    deploys: dict[str, tuple[str | Path, Path]] = {"deploy": (GPU_DEPLOY, REPO_ROOT)}
    if args.baseline_tree:
        # The baseline is timed here only if it finds these hosts converged as they are.
        try:
            assert_no_changes(run_deploy(hosts, GPU_DEPLOY, gpu_data, cwd=args.baseline_tree.resolve()).result)
            deploys["baseline"] = (GPU_DEPLOY, args.baseline_tree.resolve())
        except AssertionError as error:
            log(f"baseline left out on the stand-in GPU hosts: {str(error).splitlines()[0]}")
            assert_converged(run_deploy(hosts, GPU_DEPLOY, gpu_data).result)
    deploys["floor"] = (FLOOR, REPO_ROOT)
    time_rounds(hosts, args.gpu_sizes, args.repetitions, deploys, gpu_data, found.gpu_no_change)
    commands = round_trips_per_size(hosts, args.gpu_sizes, deploys, gpu_data, found.gpu_round_trips)
    found.gpu_round_trip_commands = {name: ran for name, ran in commands.items() if name != "floor"}
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
    parser.add_argument(
        "--gpu-sizes", type=int, nargs="*", help="sizes of the stand-in GPU host measure (default 1 3; none: skip)"
    )
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
    args.gpu_sizes = sorted(args.gpu_sizes if args.gpu_sizes is not None else [1] if quick else [1, 3])
    args.repetitions = args.repetitions or 3
    args.provision_repetitions = args.provision_repetitions or (1 if quick else 3)
    if args.repetitions < 3 and not quick:
        parser.error("--repetitions must be at least 3 (medians of alternating rounds)")
    if max(args.sizes + args.provision_sizes + args.gpu_sizes) > 20:
        parser.error("at most 20 hosts")

    require(REPORT_MODULES)  # now, not after twenty minutes of measuring
    # As ./run deploy does: pyinfra writes no bytecode, so each tree is compiled once here.
    for tree in [REPO_ROOT, *([args.baseline_tree.resolve()] if args.baseline_tree else [])]:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "labfleet")], check=False)
    ensure_engine()
    data = lab_data()
    found = Measurements()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as scratch:
        fleet = Fleet(generate_keypair(Path(scratch) / "ssh"))
        try:
            measure_no_change(fleet, args, data, found)
            if args.gpu_sizes:
                measure_gpu_standin(fleet, args, data, found)
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
