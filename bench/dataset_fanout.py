"""Issue 19's fan-out and S3 goals: 6 hosts pulling one host: dataset (star against tree), and an
s3: first sync against rclone sync by hand.

    ./run bench dataset_fanout [--mb 64] [--rate-mbit 200] [--repeat 3] [--s3-mb 48,256]

(requirements-bench.txt has moto and boto3: the S3 part runs moto's server, as
tests/e2e/test_datasets_s3.py does, through tests/e2e/harness/s3.py.)

Starts 7 test hosts (tests/e2e/harness: root and Docker, like the e2e tests): one origin that
the controller pushes a dataset to (untimed), and 6 pullers with ``host:<origin>:...``. Each
round empties the 6 copies and their records, then times a whole run of the datasets deploy
both ways, alternating which goes first:

- star: the origin's ``dataset_fanout: null``, every puller pulls from it at once (what
  labfleet did before the fan-out);
- tree: ``dataset_fanout: 2`` (the default): 2 pull from the origin, then 4 from those and
  the origin (labfleet/dataset_fanout.py).

What this machine bounds: the 7 hosts are containers on one machine, so they share one disk,
one kernel's network stack and 2 cores; without a limit the star is not slowed by any
uplink, and the tree only adds a wave. A LAN is bound by each host's uplink, so every host's
egress is shaped to ``--rate-mbit`` with tc (a token bucket on its eth0) in both runs: all
pulls served by one host share its uplink, as they would on a switch. The figure without
shaping is printed too.

The S3 part starts moto's S3 server on the controller's loopback and fills a bucket;
3 of the hosts reach it on their own loopback through an SSH remote forward
(tests/e2e/harness/tunnel.py). For each size, each round empties the copies and times a
labfleet run that fetches the bucket as an ``s3:`` dataset against ``rclone sync`` of the
same bucket to the same hosts at once, by hand with the same rclone config (the
distribution's rclone, which the untimed first run installs), and a labfleet run with
nothing to do (the deploy's own cost). The goal is at most 1.3x.

Writes the printed lines to bench/DATASETS.md, in its fan-out section (other sections kept).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.run import BENCH, log, machine, start_hosts
from tests.e2e.harness.engine import ensure_engine
from tests.e2e.harness.hosts import Fleet, generate_keypair, host_exec
from tests.e2e.harness.runner import assert_converged, assert_no_changes, run_pyinfra
from tests.e2e.test_datasets import DEPLOY, bridge_ip, host_digests, local_digests, make_dataset

ROOT = "/srv/datasets"
STATE = "/var/lib/labfleet/datasets"
GOALS = {"tree": 1.0, "s3": 1.3}
SECTION = ("<!-- fan-out and s3 (bench/dataset_fanout.py) -->", "<!-- end of fan-out and s3 -->")
BUCKET, PREFIX = "bench-data", "train"
KEY_ID, SECRET = "AKIALABFLEETBENCH001", "labfleetBenchSecret/0123456789abcdefghij"


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _on_all(hosts, command: str) -> None:
    with ThreadPoolExecutor(len(hosts)) as pool:
        list(pool.map(lambda host: host_exec(host, command, timeout=600), hosts))


def _median(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} s   ({', '.join(f'{v:.2f}' for v in values)})"


def star_against_tree(hosts, deploy: Path, scratch: Path, mb: int, rate: int, repeat: int) -> list[str]:
    origin, pullers = hosts[0], hosts[1:]
    source = make_dataset(scratch / "ref", files=100, big_mb=mb)
    expected = local_digests(source)
    size = sum(path.stat().st_size for path in source.rglob("*") if path.is_file())
    lan = {host.name: {"lan_address": bridge_ip(host), "lan_ssh_port": 22} for host in hosts}

    def host_data(fanout: int | None) -> dict:
        data = {name: dict(values) for name, values in lan.items()}
        data[origin.name]["datasets"] = {"ref": {"source": f"local:{source}", "manifest": "SHA256SUMS"}}
        data[origin.name]["dataset_fanout"] = fanout
        for puller in pullers:
            data[puller.name]["datasets"] = {
                "ref": {"source": f"host:{origin.name}:{ROOT}/ref", "manifest": "SHA256SUMS"}
            }
        return data

    sides = {"star": host_data(None), "tree": host_data(2)}
    base: dict = {"extra_ca_certificates": []}
    log("first run (untimed): packages, layout, the push to the origin, the pulls")
    assert_converged(run_pyinfra(hosts, deploy=deploy, data=base, host_data=sides["tree"], timeout=900))
    assert_no_changes(run_pyinfra(hosts, deploy=deploy, data=base, host_data=sides["tree"]))
    # The star's settings leave the trust of the tree on the pullers (authorized_keys lines
    # are never removed), which the star does not use: it changes nothing that it times.
    assert_converged(run_pyinfra(hosts, deploy=deploy, data=base, host_data=sides["star"]))

    def cold_run(side: str) -> float:
        _on_all(pullers, f"find {ROOT}/ref -mindepth 1 -delete && rm -f {STATE}/ref.*")

        def run() -> None:
            result = run_pyinfra(hosts, deploy=deploy, data=base, host_data=sides[side], timeout=900)
            assert_converged(result)
            served = [line for line in result.stderr.splitlines() if "wave 2: pulling" in line]
            if side == "tree":
                assert len(served) == 4, f"the tree pulled {len(served)} in wave 2: {served}"
            else:
                assert served == [], served

        seconds = _timed(run)
        for puller in pullers:
            assert host_digests(puller, f"{ROOT}/ref") == expected, f"{puller.name}: the copy differs ({side})"
        return seconds

    lines = [
        f"fan-out: 6 hosts pull one host: dataset ({size / 1e6:.1f} MB: 100 small files and one of {mb} MB)"
        f" from a 7th, whole datasets deploy, cold copies, {repeat} alternating rounds"
    ]
    for shaped in (True, False):
        if shaped:
            _on_all(hosts, f"tc qdisc replace dev eth0 root tbf rate {rate}mbit burst 256kb latency 100ms")
        else:
            _on_all(hosts, "tc qdisc del dev eth0 root 2>/dev/null; true")
        times: dict[str, list[float]] = {"star": [], "tree": []}
        rounds = repeat if shaped else 1
        for round_ in range(rounds):
            for side in ("star", "tree") if round_ % 2 == 0 else ("tree", "star"):
                times[side].append(cold_run(side))
            log(f"{'shaped' if shaped else 'unshaped'} round {round_ + 1}: star {times['star'][-1]:.2f} s, "
                f"tree {times['tree'][-1]:.2f} s")  # fmt: skip
        ratio = statistics.median(times["tree"]) / statistics.median(times["star"])
        label = f"each host's uplink {rate} Mbit/s (tc)" if shaped else "no uplink limit (this machine's bound)"
        lines += [
            f"  {label}:",
            f"    star (dataset_fanout: null) {_median(times['star'])}",
            f"    tree (dataset_fanout: 2)    {_median(times['tree'])}",
            f"    tree: {ratio:.2f}x the star"
            + (f" ({'meets' if ratio < GOALS['tree'] else 'misses'} the goal: sooner than the star)" if shaped else ""),
        ]
    return lines


def s3_against_rclone(hosts, deploy: Path, scratch: Path, sizes: list[int], repeat: int) -> list[str]:
    from tests.e2e.harness.s3 import moto_s3
    from tests.e2e.harness.tunnel import forward_to_host

    lines = []
    with moto_s3(KEY_ID, SECRET) as (port, client), contextlib.ExitStack() as tunnels:
        client.create_bucket(Bucket=BUCKET)
        for host in hosts:
            endpoint = tunnels.enter_context(forward_to_host(host, port))
        keys = scratch / "bench-s3.ini"
        keys.write_text(f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
        for mb in sizes:
            lines += _s3_rounds(hosts, deploy, client, endpoint, keys, mb, repeat)
    return lines


def _s3_rounds(hosts, deploy: Path, client, endpoint: str, keys: Path, mb: int, repeat: int) -> list[str]:
    """One bucket prefix of 200 small objects and one of mb MB: labfleet cold against rclone by hand."""
    prefix = f"{PREFIX}-{mb}"
    objects = {f"d{i % 4}/s{i % 3}/f{i:03d}.bin": os.urandom(200 + 37 * i) for i in range(200)}
    objects["big.bin"] = os.urandom(mb * 1024 * 1024)
    for key, body in objects.items():
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=body)
    size = sum(len(body) for body in objects.values())
    spec = {"source": f"s3:{BUCKET}/{prefix}", "s3_endpoint": endpoint, "s3_credentials_file": str(keys)}
    data = {"extra_ca_certificates": [], "datasets": {"s3set": spec}}
    log(f"s3, {mb} MB: first run (untimed): rclone installed, the keys written, the bucket fetched")
    assert_converged(run_pyinfra(hosts, deploy=deploy, data=data, timeout=900))
    assert_no_changes(run_pyinfra(hosts, deploy=deploy, data=data))
    floor = "/srv/bench-s3-floor"
    by_hand = f"rclone --config /etc/labfleet/dataset-s3/s3set.conf sync bucket:{BUCKET}/{prefix} {floor}"
    expected = {key: hashlib.sha256(body).hexdigest() for key, body in objects.items()}
    times: dict[str, list[float]] = {"labfleet": [], "rclone": [], "no-change": []}

    def labfleet() -> None:
        assert_converged(run_pyinfra(hosts, deploy=deploy, data=data, timeout=900))

    def no_change() -> None:
        assert_no_changes(run_pyinfra(hosts, deploy=deploy, data=data))

    for round_ in range(repeat):
        _on_all(
            hosts,
            f"find {ROOT}/s3set -mindepth 1 -delete && rm -rf {ROOT}/.labfleet-incoming/s3set* {floor}"
            f" && rm -f {STATE}/s3set.* && mkdir -p {floor}",
        )
        for side in ("labfleet", "rclone") if round_ % 2 == 0 else ("rclone", "labfleet"):
            times[side].append(_timed(labfleet if side == "labfleet" else lambda: _on_all(hosts, by_hand)))
        for host in hosts:
            assert host_digests(host, f"{ROOT}/s3set") == expected, f"{host.name}: s3set differs"
            assert host_digests(host, floor) == expected, f"{host.name}: rclone's copy differs"
        times["no-change"].append(_timed(no_change))
        log(f"s3 round {round_ + 1}: labfleet {times['labfleet'][-1]:.2f} s, rclone {times['rclone'][-1]:.2f} s")
    ratio = statistics.median(times["labfleet"]) / statistics.median(times["rclone"])
    return [
        f"s3: first sync of a bucket prefix ({size / 1e6:.1f} MB: 200 small objects and one of {mb} MB; moto on the"
        f" controller's loopback, reached through SSH forwards) to {len(hosts)} hosts, {repeat} alternating rounds",
        f"  labfleet (s3: dataset, whole deploy) {_median(times['labfleet'])}",
        f"  rclone sync by hand, hosts at once  {_median(times['rclone'])}",
        f"  labfleet, nothing to do             {_median(times['no-change'])}  (the deploy's own cost)",
        f"  s3: first sync: {ratio:.2f}x rclone sync by hand"
        f" ({'meets' if ratio <= GOALS['s3'] else 'misses'} the goal of {GOALS['s3']}x)",
    ]


def write_section(lines: list[str]) -> None:
    """Put the lines into bench/DATASETS.md between this bench's markers, keeping the rest."""
    info = machine()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        SECTION[0],
        f"## Fan-out and S3 (written by `./run bench dataset_fanout`, {when}, {info['cores']} cores,"
        f" {info['memory_gib']} GiB, Docker {info['docker']})",
        "",
        "```",
        *lines,
        "```",
        SECTION[1],
    ]
    path = BENCH / "DATASETS.md"
    text = path.read_text() if path.exists() else ""
    if SECTION[0] in text and SECTION[1] in text:
        before, rest = text.split(SECTION[0], 1)
        after = rest.split(SECTION[1], 1)[1]
        text = before + "\n".join(body) + after
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body) + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=64, help="the fan-out dataset's big file")
    parser.add_argument("--rate-mbit", type=int, default=200, help="each host's shaped uplink")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--s3-mb", default="48,256", help="the bucket's big object, one comparison per size")
    parser.add_argument("--skip-fanout", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()

    ensure_engine()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-fanout-") as scratch_dir:
        scratch = Path(scratch_dir)
        fleet = Fleet(generate_keypair(scratch / "ssh"))
        try:
            deploy = scratch / "datasets_deploy.py"
            deploy.write_text(DEPLOY.replace("preflight.check_host(settings)\n", ""))
            hosts = start_hosts(fleet, 7 if not args.skip_fanout else 3, engine=False)
            if not args.skip_fanout:
                lines += star_against_tree(hosts, deploy, scratch, args.mb, args.rate_mbit, args.repeat)
            if not args.skip_s3:
                _on_all(hosts, "tc qdisc del dev eth0 root 2>/dev/null; true")
                sizes = [int(mb) for mb in args.s3_mb.split(",")]
                lines += s3_against_rclone(hosts[:3], deploy, scratch, sizes, args.repeat)
        finally:
            fleet.remove_all()
    print("\n".join(lines))
    write_section(lines)


if __name__ == "__main__":
    main()
