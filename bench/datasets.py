"""How much the datasets step costs over plain rsync: a cold push to 3 hosts, and a no-change run.

    ./run bench datasets [--files 300] [--big-mb 50] [--repeat 3]

Starts 3 test hosts (tests/e2e/harness, so it needs root and Docker like the e2e tests),
generates a dataset on the controller, and times, in the same run:

- labfleet: `pyinfra -y <inventory> <datasets-only deploy>` pushing the dataset to all 3
  hosts (cold: the dataset directories are emptied before each repeat), then the same run
  again with nothing to do;
- the floor: `rsync -a` of the same data to the same 3 hosts, in parallel (as pyinfra runs
  hosts), over the same SSH options, cold and then with nothing to do;
- rsync alone with labfleet's options into a directory made as labfleet makes a dataset's
  (setgid, its group, the default ACL), cold: between it and labfleet is labfleet's own
  cost, between it and the floor the cost of the options and the directory.

Prints medians and the ratios; goals are at most 1.2x (cold) and 1.5x (no change). It
asserts nothing about time.

    ./run bench datasets --noop-files 20000 [--skip-push] [--whole]

adds the issue 19 comparison, on the same 3 hosts: a no-change run of the same deploy with a
dataset of that many small files declared (pushed once, untimed) against that deploy with
no dataset, alternating, in the same rounds; the goal is at most 1.5x. The deploy is the
preflight and datasets steps (the other steps add the same cost to both sides, so the ratio
of the whole deploy.py would be smaller). ``--whole`` adds the same comparison on the whole
deploy.py (3 more hosts with the distribution's engine, converged with bench/run.py's
lab_data(): the jupyter image shipped), which is what issue 19's goal is stated against.
The round trips per host of each come from an extra --debug run. ``--skip-push`` leaves out
the cold push rows above. The figures are written to bench/DATASETS.md (the printed lines,
with the machine and the date; --whole's in their own section).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.dataset_fanout import SECTION
from bench.run import BENCH, count_round_trips, lab_data, machine, run_deploy, start_hosts
from labfleet.dataset_push import push_command
from labfleet.dataset_rsync import rsync_flags
from labfleet.model import datasets as parse_datasets
from tests.e2e.harness.engine import ensure_engine
from tests.e2e.harness.hosts import Fleet, generate_keypair, host_exec
from tests.e2e.harness.runner import assert_converged, assert_no_changes, run_pyinfra, write_inventory
from tests.e2e.test_datasets import DEPLOY, inodes, make_dataset

GOALS = {"cold push": 1.2, "no-change": 1.5, "one changed file": 2.0}
FLOOR_DIR = "/srv/bench-floor"
AS_LABFLEET = "/srv/datasets/bench-as-labfleet"
FANOUT_SECTION = SECTION[0]
WHOLE_DEPLOY = "deploy.py"
WHOLE_SECTION = ("<!-- whole deploy (./run bench datasets --whole) -->", "<!-- end of whole deploy -->")


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _disk_sectors() -> int:
    """Sectors read, written and discarded so far on the machine's disks (not partitions)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if Path("/sys/block", fields[2]).exists() and not fields[2].startswith(("loop", "ram")):
            total += sum(int(fields[index]) for index in (5, 9, 16) if index < len(fields))
    return total


def _settle(limit_s: float = 120.0, quiet_sectors: int = 2048) -> None:
    """sync, then wait until the disks move less than quiet_sectors (1 MB) in a second, at most limit_s."""
    subprocess.run(["sync"], check=True)
    deadline = time.monotonic() + limit_s
    before = _disk_sectors()
    while time.monotonic() < deadline:
        time.sleep(1)
        now = _disk_sectors()
        if now - before < quiet_sectors:
            return
        before = now


def _floor_rsync(
    hosts, inventory_dir: Path, source: Path, dest: str = FLOOR_DIR, flags: tuple[str, ...] = ("-a",)
) -> None:
    """Plain rsync -a (or flags) to every host at once, over the SSH options pyinfra uses for it."""
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
        argv = push_command(data, host.name, str(source), dest, list(flags), sudo=True)
        processes.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        if process.returncode != 0:
            raise SystemExit(f"floor rsync failed: {stderr}")


def noop_with_a_dataset(
    hosts,
    deploy: Path,
    scratch: Path,
    files: int,
    repeat: int,
    source: Path | None = None,
    name: str = "many",
    base: dict | None = None,
) -> list[str]:
    """No-change runs with a dataset of files small files declared against none, alternating; report lines.

    + source: a dataset already made (and pushed by push_against_rsync, under name, without a
      manifest) instead of a new one; then one changed file is timed too (one_changed_file)
    + base: the rest of the hosts' data (default: none but no extra CA certificates); the
      whole deploy.py takes bench.run's lab_data()
    """
    spec = {"source": f"local:{source}"} if source else {"manifest": "SHA256SUMS"}
    source = source or make_dataset(scratch / name, files=files, big_mb=0, seed=19)
    base = base if base is not None else {"extra_ca_certificates": []}
    declared = {**base, "datasets": {name: {"source": f"local:{source}", **spec}}}
    undeclared = {**base, "datasets": {}}
    started = time.perf_counter()
    assert_converged(run_pyinfra(hosts, deploy=deploy, data=declared))
    first_sync = time.perf_counter() - started
    # The record written, the next run changes nothing; the other side is converged too.
    assert_no_changes(run_pyinfra(hosts, deploy=deploy, data=declared))
    assert_no_changes(run_pyinfra(hosts, deploy=deploy, data=undeclared))
    inventory_dir = scratch / f"inventory-{name}"
    inventory_dir.mkdir()
    write_inventory(inventory_dir, hosts, declared)
    # What a no-change deploy ran before the records: labfleet's rsync dry run to each host.
    (dataset,) = parse_datasets(declared["datasets"])
    dry_run = (*rsync_flags(dataset, "labdata"), "--dry-run")
    times: dict[str, list[float]] = {"with": [], "without": [], "dry run": []}
    for _ in range(repeat):
        for side, data in (("with", declared), ("without", undeclared)):
            run = run_deploy(hosts, deploy, data)
            assert_no_changes(run.result)
            times[side].append(run.seconds)
        times["dry run"].append(
            _timed(lambda: _floor_rsync(hosts, inventory_dir, source, f"/srv/datasets/{name}", dry_run))
        )
    trips = {}
    for side, data in (("with", declared), ("without", undeclared)):
        debug = run_deploy(hosts, deploy, data, debug=True)
        assert_no_changes(debug.result)
        trips[side] = count_round_trips(debug.result.stderr, hosts)[0]
    with_s, without_s = statistics.median(times["with"]), statistics.median(times["without"])
    dry_s = statistics.median(times["dry run"])
    ratio = with_s / without_s
    goal = GOALS["no-change"]
    changed = one_changed_file(hosts, deploy, source, name, declared, repeat, with_s) if "manifest" not in spec else []
    which = "the whole deploy.py" if str(deploy) == WHOLE_DEPLOY else "a datasets-only deploy (preflight + datasets)"
    return [
        f"no-change of {which} with {files} files declared ({_size(source) / 1e6:.1f} MB; "
        + ("pushed above" if "manifest" not in spec else f"first sync {first_sync:.1f} s, untimed")
        + f"), 3 hosts, {repeat} alternating rounds:",
        f"  with the dataset    median {with_s:6.2f} s   ({', '.join(f'{v:.2f}' for v in times['with'])}),"
        f" {trips['with']:.0f} round trip(s) per host",
        f"  without a dataset   median {without_s:6.2f} s   ({', '.join(f'{v:.2f}' for v in times['without'])}),"
        f" {trips['without']:.0f} round trip(s) per host",
        f"  rsync dry run alone median {dry_s:6.2f} s   ({', '.join(f'{v:.2f}' for v in times['dry run'])}),"
        " to the 3 hosts at once: what a no-change deploy ran before the records, on top of the deploy",
        f"  no-change with a dataset: {ratio:.2f}x the same deploy without one"
        f" ({'meets' if ratio <= goal else 'misses'} the goal of {goal}x);"
        f" before the records, at least {(without_s + dry_s) / without_s:.2f}x (the deploy plus the dry run)",
        *changed,
    ]


def one_changed_file(hosts, deploy: Path, source: Path, name: str, data: dict, repeat: int, noop_s: float) -> list[str]:
    """Runs after one file of the source changed (each round another): only it moves; timed against no change.

    The dataset has no manifest: with one, every sync that moves a file checks the whole
    manifest again (every byte on every host), which is not what this goal measures.
    """
    small = sorted(path for path in source.rglob("f*.bin"))
    directory = f"/srv/datasets/{name}"
    times, moved = [], []
    for round_ in range(repeat):
        target = small[(round_ * 7919) % len(small)]
        relative = str(target.relative_to(source))
        before = {host.name: inodes(host, directory) for host in hosts}
        target.write_bytes(os.urandom(target.stat().st_size + 1))
        run = run_deploy(hosts, deploy, data)
        assert_converged(run.result)
        times.append(run.seconds)
        for host in hosts:
            after = inodes(host, directory)
            rewritten = sorted(path for path in after if after[path] != before[host.name].get(path))
            assert rewritten == [relative], f"{host.name}: rewritten {rewritten[:5]} (expected only {relative})"
            moved.append(len(rewritten))
    changed_s = statistics.median(times)
    ratio = changed_s / noop_s
    goal = GOALS["one changed file"]
    return [
        f"  one changed file    median {changed_s:6.2f} s   ({', '.join(f'{v:.2f}' for v in times)}),"
        f" {max(moved)} file(s) rewritten per host (checked by inode and ctime on every host)",
        f"  one changed file: {ratio:.2f}x the no-change run with the dataset"
        f" ({'meets' if ratio <= goal else 'misses'} the goal of {goal}x)",
    ]


def _size(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


def _write_results(lines: list[str]) -> None:
    info = machine()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        "# Datasets benchmark (written by `./run bench datasets`)",
        "",
        f"Measured {when} on {info['cores']} cores, {info['memory_gib']} GiB, Docker {info['docker']}"
        " (controller and test hosts on one machine): ratios in the same run are what to compare.",
        "",
        "```",
    ]
    # The whole-deploy figures (--whole) and the fan-out and S3 ones (bench/dataset_fanout.py)
    # share the file: kept as they are.
    path = BENCH / "DATASETS.md"
    previous = path.read_text() if path.exists() else ""
    kept = previous[previous.index(WHOLE_SECTION[0]) :] if WHOLE_SECTION[0] in previous else ""
    if not kept and FANOUT_SECTION in previous:
        kept = FANOUT_SECTION + previous.split(FANOUT_SECTION, 1)[1]
    path.write_text("\n".join([*header, *lines, "```", ""]) + ("\n" + kept if kept else ""))


def _write_whole(lines: list[str]) -> None:
    """The --whole figures, between their markers, after the datasets-only ones and before the fan-out's."""
    info = machine()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        WHOLE_SECTION[0],
        f"## The whole deploy.py (written by `./run bench datasets --whole`, {when}, {info['cores']} cores)",
        "",
        "```",
        *lines,
        "```",
        WHOLE_SECTION[1],
        "",
    ]
    path = BENCH / "DATASETS.md"
    previous = path.read_text() if path.exists() else ""
    if WHOLE_SECTION[0] in previous:
        head, rest = previous.split(WHOLE_SECTION[0], 1)
        tail = rest.split(WHOLE_SECTION[1], 1)[1].lstrip("\n") if WHOLE_SECTION[1] in rest else ""
    elif FANOUT_SECTION in previous:
        head, tail = previous.split(FANOUT_SECTION, 1)
        tail = FANOUT_SECTION + tail
    else:
        head, tail = previous, ""
    path.write_text(head + "\n".join(section) + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--big-mb", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--noop-files", type=int, default=0, help="small files of the no-change comparison (0: none)")
    parser.add_argument("--skip-push", action="store_true", help="leave out the cold push and its no-change rows")
    parser.add_argument("--cold-repeat", type=int, help="rounds of the cold push (default: --repeat)")
    parser.add_argument(
        "--whole",
        action="store_true",
        help="only the no-change comparison (--noop-files, default 200000) on the whole deploy.py",
    )
    args = parser.parse_args()

    ensure_engine()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        # The controller's listings of the bench's sources (labfleet.dataset_changes) go with it.
        os.environ["XDG_CACHE_HOME"] = str(scratch / "cache")
        fleet = Fleet(generate_keypair(scratch / "ssh"))
        try:
            if args.whole:
                # The goal is stated against a whole deploy: the comparison on hosts that
                # deploy.py converges (engine, the jupyter image, JupyterLab), as bench/run.py does.
                lines = noop_with_a_dataset(
                    start_hosts(fleet, 3),
                    Path(WHOLE_DEPLOY),
                    scratch,
                    args.noop_files or 200_000,
                    args.repeat,
                    name="whole",
                    base=lab_data(),
                )
                print("\n".join(lines))
                _write_whole(lines)
                return
            hosts = fleet.start_hosts(3)
            deploy = scratch / "datasets_deploy.py"
            deploy.write_text(DEPLOY.replace("preflight.check_host(settings)\n", ""))
            if not args.skip_push:
                cold = args.cold_repeat or args.repeat
                pushed, source = push_against_rsync(hosts, deploy, scratch, args.files, args.big_mb, cold)
                # The same dataset, declared or not, and one file of it changed (issue 19's goals).
                lines += pushed + noop_with_a_dataset(
                    hosts, deploy, scratch, args.files, args.repeat, source=source, name="bench"
                )
            if args.noop_files:
                lines += noop_with_a_dataset(hosts, deploy, scratch, args.noop_files, args.repeat)
        finally:
            fleet.remove_all()
    print("\n".join(lines))
    _write_results(lines)


def push_against_rsync(
    hosts, deploy: Path, scratch: Path, files: int, big_mb: int, repeat: int
) -> tuple[list[str], Path]:
    """Cold pushes and no-change runs against plain rsync of the same tree; report lines, and the dataset."""
    source = make_dataset(scratch / "bench", files=files, big_mb=big_mb)
    size = _size(source)
    data = {"datasets": {"bench": f"local:{source}"}, "extra_ca_certificates": []}
    inventory_dir = scratch / "inventory"
    inventory_dir.mkdir()
    write_inventory(inventory_dir, hosts, data)

    # Untimed: packages (rsync, acl), group, layout, so both sides start from the same host state.
    empty = scratch / "empty"
    empty.mkdir()
    assert_converged(run_pyinfra(hosts, deploy=deploy, data={**data, "datasets": {"bench": f"local:{empty}"}}))

    def empty_targets() -> None:
        # The record goes too: without it the host's copy is not known to match, so the push runs.
        # AS_LABFLEET is made as labfleet makes a dataset directory: setgid, group, default ACL.
        for host in hosts:
            host_exec(
                host,
                f"rm -rf {FLOOR_DIR} {AS_LABFLEET} /srv/datasets/bench/* /var/lib/labfleet/datasets/bench.record"
                f" && mkdir -p {FLOOR_DIR} && install -d -g labdata -m 2755 {AS_LABFLEET}"
                f" && setfacl --modify default:user::rwx,default:group::r-x,default:other::r-x {AS_LABFLEET}",
            )

    # pyinfra's own fixed cost (start, connect, disconnect), for reading the no-change ratio.
    empty_deploy = scratch / "empty_deploy.py"
    empty_deploy.write_text('"""No operations."""\n')
    names = ("labfleet cold", "floor cold", "rsync as labfleet", "labfleet noop", "floor noop", "pyinfra, no ops")
    times: dict[str, list[float]] = {name: [] for name in names}
    (dataset,) = parse_datasets(data["datasets"])
    cold = {
        "labfleet cold": lambda: assert_converged(run_pyinfra(hosts, deploy=deploy, data=data)),
        "floor cold": lambda: _floor_rsync(hosts, inventory_dir, source),
        # rsync alone with labfleet's options into a directory made as a dataset's (setgid,
        # default ACL): what is left of the gap above it is labfleet's own cost.
        "rsync as labfleet": lambda: _floor_rsync(
            hosts, inventory_dir, source, AS_LABFLEET, tuple(rsync_flags(dataset, "labdata"))
        ),
    }
    for round_ in range(repeat):
        empty_targets()
        # Each side in turn goes first, and starts on a quiet disk: controller and hosts share
        # one kernel and one disk, and removing 600,000 files or writing 4.4 GB goes on there
        # (journal, writeback, discards) long after the command returns.
        for name in sorted(cold, reverse=bool(round_ % 2)):
            _settle()
            times[name].append(_timed(cold[name]))
        times["labfleet noop"].append(_timed(lambda: assert_no_changes(run_pyinfra(hosts, deploy=deploy, data=data))))
        times["floor noop"].append(_timed(lambda: _floor_rsync(hosts, inventory_dir, source)))
        times["pyinfra, no ops"].append(_timed(lambda: run_pyinfra(hosts, deploy=empty_deploy, data=data)))

    median = {name: statistics.median(values) for name, values in times.items()}
    lines = [f"dataset: {files} files + one of {big_mb} MB ({size / 1e6:.1f} MB), 3 hosts, {repeat} runs"]
    for name, values in times.items():
        lines.append(f"  {name:16s} median {median[name]:6.2f} s   ({', '.join(f'{v:.2f}' for v in values)})")
    for label, ours, floor in (
        ("cold push", "labfleet cold", "floor cold"),
        ("no-change", "labfleet noop", "floor noop"),
    ):
        ratio = median[ours] / median[floor]
        verdict = "meets" if ratio <= GOALS[label] else "misses"
        lines.append(f"  {label}: {ratio:.2f}x the floor ({verdict} the goal of {GOALS[label]}x)")
    lines.append(
        f"  cold push: {median['labfleet cold'] / median['rsync as labfleet']:.2f}x rsync with labfleet's options"
        f" into a dataset directory, which is {median['rsync as labfleet'] / median['floor cold']:.2f}x the floor"
    )
    return lines, source


if __name__ == "__main__":
    main()
