"""Image delivery: the bytes each host receives and the time, for ship and registry (issue 7).

    ./run bench delivery                 # ship and registry to 1, 3 and 6 hosts
    ./run bench delivery --sizes 1 3 --layer-mib 16

Needs what the end-to-end tests need (root and Docker; see tests/README.md). For each mode
and fleet size it starts fresh engine hosts (plus one registry host, group `registry`, in
registry mode) and runs, with the end-to-end tests' whole-deploy settings:

1. the first delivery, from this checkout (tree A);
2. the same deploy again, image unchanged: it must report no change, and the controller
   must not build;
3. a deploy from a copy of the checkout (tree B) whose container/scripts/ holds one more
   file of random bytes (--layer-mib): a new tag whose image differs from A's in the layer
   of `COPY scripts/` and the small `RUN chmod` layer after it;
4. the floor, `bench/deploys/floor.py`, on the same hosts: what one SSH command moves.

Bytes are what each host's network interface received (`rx_bytes` of its eth0) during the
run, pyinfra's SSH traffic included; the floor shows how much of that is SSH alone. The
changed layers' size is read from the new image's `docker save` archive: the layer files
whose diff id the old image lacks. Goals: unchanged, no image bytes and no build; one layer
changed in registry mode, at most 1.2x the changed layers' size per pulling host.

Writes bench/DELIVERY.md and bench/delivery.json; asserts nothing about time. Everything it
sends goes to 127.0.0.1 and to its own test hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.delivery_large import SECTION as LARGE_SECTION
from bench.run import BENCH, DEPLOY, FLOOR, REPO_ROOT, lab_data, log, machine, run_deploy, start_hosts
from labfleet import archives
from tests.e2e.harness.checkout import repo_copy
from tests.e2e.harness.engine import docker, ensure_engine
from tests.e2e.harness.hosts import Fleet, generate_keypair
from tests.e2e.harness.runner import assert_converged, assert_no_changes
from tests.e2e.probes import bridge_ip, env_tag, rx_bytes

GOAL_LAYER_RATIO = 1.2
LAYER_FILE = "container/scripts/bench-layer.bin"
REGISTRY_PORT = 5000


def controller_images() -> set[str]:
    """Every image id in the controller's engine, intermediate ones included: a build adds some."""
    return set(docker("images", "--all", "--quiet", "--no-trunc").stdout.split())


def tree_with_new_layer(destination: Path, layer_bytes: int) -> Path:
    """A copy of this checkout plus one file of random bytes in the image's scripts/."""
    repo_copy(destination)
    (destination / LAYER_FILE).write_bytes(os.urandom(layer_bytes))
    return destination


def new_layers_bytes(archive: Path, old_ref: str) -> int:
    """The uncompressed size of the layers in a `docker save` archive that old_ref lacks.

    Both archive formats (one directory per layer, or an OCI layout) list the layer files in
    manifest.json in the order of the config's diff ids.
    """
    old = set(json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", old_ref).stdout))
    sizes, small = {}, {}
    with archives.open_compressed(archive) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            sizes[member.name] = member.size
            if member.isfile() and member.size < 1 << 20:  # manifest and config; big layers are read past
                content = tar.extractfile(member)
                if content is not None:
                    small[member.name] = content.read()
    (entry,) = json.loads(small["manifest.json"])
    diff_ids = json.loads(small[entry["Config"]])["rootfs"]["diff_ids"]
    return sum(sizes[path] for path, diff_id in zip(entry["Layers"], diff_ids, strict=True) if diff_id not in old)


def archive_of(tree: Path, ref: str) -> Path:
    """The archive the deploy from tree saved for ref (archives.saved_archive's cache)."""
    return archives.archive_path(docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip(), tree)


def measure(fleet: Fleet, mode: str, size: int, trees: dict[str, Path]) -> dict:
    """One fleet of size hosts: first delivery, unchanged, one layer changed, floor."""
    hosts = start_hosts(fleet, size + (mode == "registry"))
    data, groups = {**lab_data(), "image_delivery": mode}, None
    registry = None
    if mode == "registry":
        registry, hosts = hosts[0], hosts[1:]
        data["image_registry"] = f"{bridge_ip(registry)}:{REGISTRY_PORT}"
        groups = {"registry": [registry]}
    everyone = hosts + ([registry] if registry else [])
    found: dict = {"mode": mode, "hosts": size}
    try:
        for step, tree, check in (
            ("first", trees["A"], assert_converged),
            ("unchanged", trees["A"], assert_no_changes),
            ("layer", trees["B"], assert_converged),
            ("floor", trees["A"], assert_converged),
        ):
            images_before = controller_images()
            before = {host.name: rx_bytes(host) for host in everyone}
            run = run_deploy(everyone, FLOOR if step == "floor" else DEPLOY, data, cwd=tree, groups=groups)
            after = {host.name: rx_bytes(host) for host in everyone}
            check(run.result)
            received = {name: after[name] - before[name] for name in before}
            found[step] = {
                "seconds": run.seconds,
                "pullers_bytes": [received[host.name] for host in hosts],
                "registry_bytes": received[registry.name] if registry else None,
                "controller_built": len(controller_images() - images_before) > 0,
            }
            if step in ("first", "layer"):
                found[f"tag_{step}"] = env_tag(hosts[0])
            log(
                f"{mode}, {size} host(s), {step}: {run.seconds:.1f} s, "
                f"median {statistics.median(found[step]['pullers_bytes']) / 2**20:.2f} MiB per host"
                + (f", registry host {found[step]['registry_bytes'] / 2**20:.2f} MiB" if registry else "")
            )
    finally:
        fleet.remove(everyone)
    return found


def markdown(results: list[dict], info: dict) -> str:
    mib = 2**20
    layer = info["changed_layers_bytes"]
    lines = [
        "# Benchmark results: image delivery, bytes and time",
        "",
        "Written by `python -m bench.delivery` (see its docstring); do not edit by hand.",
        "",
        f"Measured {info['date']} on {info['cores']} cores, {info['memory_gib']} GiB, Linux {info['kernel']}, "
        f"Docker {info['docker']} (controller and test hosts on one machine), Python {info['python']}, "
        f"pyinfra {info['pyinfra']}; one round per row; the whole benchmark took {info['bench_minutes']} min.",
        "",
        f"Image A is the `jupyter` profile on the harness's Debian base: {info['image_bytes'] / mib:.0f} MiB in the "
        f"engine, a {info['archive_bytes'] / mib:.0f} MiB gzip archive. Image B adds one file of "
        f"{info['layer_mib']} MiB of random bytes to container/scripts/: the layers B has and A lacks hold "
        f"{layer / mib:.2f} MiB.",
        "",
        "Bytes are what each host's eth0 received during the run, SSH included; the floor (one "
        "`server.shell('true')`) is what SSH alone costs. Per pulling host: the median over the fleet. "
        f"Goals: unchanged, no image bytes and no build; one layer changed in registry mode, at most "
        f"{GOAL_LAYER_RATIO}x the changed layers per pulling host.",
        "",
        "| mode | hosts | first delivery | per host | unchanged | per host | built | floor | per host "
        "| one layer changed | per host | ÷ changed layers | registry host: first, unchanged, layer |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in results:
        per_host = {step: statistics.median(row[step]["pullers_bytes"]) for step in ("first", "unchanged", "layer")}
        floor = statistics.median(row["floor"]["pullers_bytes"])
        ratio = (per_host["layer"] - floor) / layer
        mark = "" if row["mode"] != "registry" else (" ✓" if ratio <= GOAL_LAYER_RATIO else " ✗")
        registry = (
            ", ".join(f"{row[step]['registry_bytes'] / mib:.1f} MiB" for step in ("first", "unchanged", "layer"))
            if row["mode"] == "registry"
            else "–"
        )
        lines.append(
            f"| {row['mode']} | {row['hosts']} | {row['first']['seconds']:.1f} s | {per_host['first'] / mib:.1f} MiB "
            f"| {row['unchanged']['seconds']:.1f} s | {per_host['unchanged'] / 1024:.0f} KiB "
            f"| {'yes' if row['unchanged']['controller_built'] else 'no'} "
            f"| {row['floor']['seconds']:.1f} s | {floor / 1024:.0f} KiB "
            f"| {row['layer']['seconds']:.1f} s | {per_host['layer'] / mib:.2f} MiB | **{ratio:.2f}x**{mark} "
            f"| {registry} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", choices=["ship", "registry"], default=["ship", "registry"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 6], help="pulling hosts per fleet")
    parser.add_argument("--layer-mib", type=int, default=32, help="size of the changed layer's new file")
    parser.add_argument("--output", type=Path, default=BENCH, help="where DELIVERY.md and delivery.json go")
    args = parser.parse_args(argv)
    if max(args.sizes) > 11:
        parser.error("at most 11 pulling hosts")
    ensure_engine()
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-delivery-") as scratch:
        trees = {"A": REPO_ROOT, "B": tree_with_new_layer(Path(scratch) / "tree-b", args.layer_mib * 2**20)}
        fleet = Fleet(generate_keypair(Path(scratch) / "ssh"))
        try:
            for size in args.sizes:
                for mode in args.modes:
                    results.append(measure(fleet, mode, size, trees))
        finally:
            fleet.remove_all()
        tags = {"A": results[0]["tag_first"], "B": results[0]["tag_layer"]}
        archive = archive_of(trees["B"], tags["B"])
        info = machine()
        info.update(
            bench_minutes=round((time.monotonic() - started) / 60, 1),
            layer_mib=args.layer_mib,
            tags=tags,
            image_bytes=int(docker("image", "inspect", "--format", "{{.Size}}", tags["A"]).stdout),
            archive_bytes=archive_of(trees["A"], tags["A"]).stat().st_size,
            changed_layers_bytes=new_layers_bytes(archive, tags["A"]),
        )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "delivery.json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    report = args.output / "DELIVERY.md"
    # The default image's section (bench/delivery_large.py) is measured on its own: kept.
    kept = report.read_text() if report.exists() else ""
    kept = kept[kept.index(LARGE_SECTION) :] if LARGE_SECTION in kept else ""
    report.write_text(markdown(results, info) + ("\n" + kept if kept else ""))
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
