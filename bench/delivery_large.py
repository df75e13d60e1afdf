"""Delivery of the default image (`pytorch`, CUDA 12.8): compression, first delivery, a real bump.

    ./run bench delivery_large                       # every phase (about 30 min, ~30 GB of disk)
    ./run bench delivery_large --phases codecs

Needs what the end-to-end tests need (root and Docker; see tests/README.md), the test wheel
cache filled with the pytorch-cu128 lock (tests/e2e/harness/wheels.py), and room on disk: a
host that loads the 8.4 GB image holds about twice that while the engine unpacks the archive.
It works from copies of this checkout (their archive caches are their own), with the
end-to-end tests' whole-deploy settings and `image_profile: pytorch`:

1. codecs: for each of gzip (level 1, Python's), pigz (-1) and zstd (-3, all cores), the
   controller's save and compression, the copy over SSH to one host, and the decompression;
2. ship: a deploy to a fresh host (the fastest codec), then a real one-package bump
   (bench/bump.py: jupyterlab-pygments 0.3.0 -> 0.2.2, in slice 18 of 20);
3. registry: a registry host and one pulling host get the image, then the bump.

Bytes are what each host's eth0 received during the deploy, SSH included. The layers a
bump changed, and what moving by chain ids alone would move, are read off the images' diff
ids and the saved archive's layer sizes (uncompressed). Phases run alone add to the figures
of earlier runs. Writes the section "The default image" of bench/DELIVERY.md and
bench/delivery_large.json; asserts nothing about time. Everything it sends goes to
127.0.0.1 and to its own test hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.bump import bumped_context
from bench.run import BENCH, DEPLOY, lab_data, log, machine, run_deploy, start_hosts
from labfleet import archives
from labfleet.image import WHEELS_ENV
from labfleet.model import lock_file
from tests.e2e.harness import wheels
from tests.e2e.harness.checkout import repo_copy
from tests.e2e.harness.engine import docker, ensure_engine
from tests.e2e.harness.hosts import Fleet, generate_keypair, host_exec
from tests.e2e.harness.images import base_image
from tests.e2e.harness.runner import assert_converged
from tests.e2e.probes import bridge_ip, env_tag, rx_bytes

SECTION = "## The default image (pytorch, CUDA 12.8)"
REGISTRY_PORT = 5000
PHASES = ("codecs", "ship", "registry", "slices")


def inspect(ref: str, field: str) -> str:
    return docker("image", "inspect", "--format", field, ref).stdout.strip()


def layer_sizes(archive: Path) -> list[int]:
    """Each layer's uncompressed size, bottom first, from the archive's index (archives.py)."""
    index = archives._index(archives.Archive("", "", archive, 0, ()))
    return [index["sizes"][path] for path in index["layers"]]


def save_timed(tree: Path, tag: str, codec: str) -> dict:
    """Save and compress tag with codec on the controller, into tree's cache; seconds and bytes."""
    script = (
        "import sys; from labfleet import archives; print(archives.ControllerImages().saved_archive(sys.argv[1]).path)"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script, tag],
        cwd=tree,
        env={**os.environ, archives.CODEC_ENV: codec},
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.monotonic() - started
    path = Path(done.stdout.strip().splitlines()[-1])
    return {"codec": codec, "save_seconds": seconds, "archive_bytes": path.stat().st_size, "archive": str(path)}


def deploy(hosts, data, tree: Path, groups=None, codec: str | None = None) -> dict:
    if codec:
        os.environ[archives.CODEC_ENV] = codec
    before = {host.name: rx_bytes(host) for host in hosts}
    run = run_deploy(hosts, DEPLOY, data, cwd=tree, groups=groups)
    assert_converged(run.result)
    return {"seconds": run.seconds, "bytes": {host.name: rx_bytes(host) - before[host.name] for host in hosts}}


def changed_layers(old_tag: str, new_tag: str, archive: Path) -> dict:
    """What a bump changed: the layers whose diff ids the old image lacks, and what chains alone move."""
    old = json.loads(inspect(old_tag, "{{json .RootFS.Layers}}"))
    new = json.loads(inspect(new_tag, "{{json .RootFS.Layers}}"))
    sizes = layer_sizes(archive)
    first = next(i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b)
    return {
        "layers": len(new),
        "first_changed_layer": first + 1,
        "changed_bytes": sum(size for diff_id, size in zip(new, sizes, strict=True) if diff_id not in set(old)),
        "above_first_change_bytes": sum(sizes[first:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--codecs", nargs="+", choices=sorted(archives.CODECS), default=["gzip", "pigz", "zstd"])
    parser.add_argument("--ship-codec", choices=sorted(archives.CODECS), help="default: the fastest measured")
    parser.add_argument("--output", type=Path, default=BENCH)
    args = parser.parse_args(argv)
    ensure_engine()
    started = time.monotonic()
    base = base_image("trixie")
    # Phases run on their own add to the figures of earlier ones.
    earlier = args.output / "delivery_large.json"
    results: dict = json.loads(earlier.read_text()) if earlier.exists() else {}
    results["phases"] = sorted(set(results.get("phases", [])) | set(args.phases))
    data = {**lab_data(), "image_profile": "pytorch"}
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-large-") as scratch_name:
        scratch = Path(scratch_name)
        lock = lock_file("pytorch", "12.8")
        assert lock is not None
        cache = wheels.fill([lock], base)
        fleet = Fleet(generate_keypair(scratch / "ssh"), session="bench-large")
        tree_a = repo_copy(scratch / "tree-a")
        tree_b = repo_copy(scratch / "tree-b")
        bump = bumped_context(workdir=scratch, wheel_dir=cache)
        shutil.rmtree(tree_b / "container")
        shutil.copytree(bump.context, tree_b / "container")
        results["bump"] = {"package": bump.package, "from": bump.old_version, "to": bump.new_version, "slot": bump.slot}
        try:
            with wheels.serve(cache) as url:
                os.environ[WHEELS_ENV] = url
                results |= measure(fleet, data, tree_a, tree_b, args)
        finally:
            fleet.remove_all()
            for tree in (tree_a, tree_b):
                shutil.rmtree(tree / "build" / "images", ignore_errors=True)
    minutes = round((time.monotonic() - started) / 60 + results.get("machine", {}).get("bench_minutes", 0), 1)
    results["machine"] = machine() | {"bench_minutes": minutes}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "delivery_large.json").write_text(json.dumps(results, indent=2) + "\n")
    write_section(args.output / "DELIVERY.md", markdown(results))
    print(markdown(results))
    return 0


def room(needed_gib: float, patience_s: float = 600) -> None:
    """Wait until the disk has needed_gib free (other work shares it); stop the bench after patience_s."""
    deadline = time.monotonic() + patience_s
    while (free := shutil.disk_usage("/var/lib/docker").free / 2**30) < needed_gib:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {free:.0f} GiB free, {needed_gib:.0f} needed: stopped")
        log(f"{free:.0f} GiB free, waiting for {needed_gib:.0f}")
        time.sleep(30)


def slice_costs(tag: str) -> list[dict]:
    """For a bump in each slice above torch's: what ship sends (labfleet.archives.plan_layers on
    the image's own layers, the bumped slice's two layers and the top one new) and what moving
    by chain ids (`docker pull`) sends: computed from the layer sizes, uncompressed."""
    history = docker("history", "--human=false", "--no-trunc", "--format", "{{.Size}}|{{.CreatedBy}}", tag)
    steps = [line.split("|", 1) for line in reversed(history.stdout.splitlines())]
    # docker history lists every step; RootFS.Layers only those that wrote a layer
    # (non-empty, or a RUN/COPY/ADD): pair them in order.
    layers = json.loads(inspect(tag, "{{json .RootFS.Layers}}"))
    written = [(int(size), how) for size, how in steps if int(size) > 0 or "#(nop)" not in how or " COPY " in how]
    if len(written) != len(layers):
        return []
    sizes = tuple(size for size, _ in written)
    engine = {"store": "classic", "version": "26.1.5", "fill_failed": False}
    engine["images"] = [{"id": "sha256:old", "size": sum(sizes), "layers": layers}]
    costs = []
    for k in range(13, 21):
        changed = {i for i, (_, how) in enumerate(written) if f"lock-{k:02d}.txt" in how} | {len(layers) - 1}
        new = tuple(f"sha256:new{i}" if i in changed else diff_id for i, diff_id in enumerate(layers))
        plan = archives.plan_layers(new, engine, sizes)  # type: ignore[arg-type]
        first = min(changed)
        costs.append(
            {
                "slice": k,
                "slice_bytes": sum(sizes[i] for i in changed),
                "ship_bytes": sum(sizes[i] for i in plan.send),
                "chain_bytes": sum(sizes[first:]),
                "image_bytes": sum(sizes),
            }
        )
    return costs


def codec_row(host, tree: Path, tag: str, codec: str) -> dict:
    """One codec: the controller's save and compression, the copy over SSH to host, the decompression.

    The test hosts run on this machine, so the decompression is timed here, on the same CPUs;
    the engine's unpacking and registering of the layers that follows is the same for every
    codec and is timed once, in the first delivery.
    """
    row = save_timed(tree, tag, codec)
    started = time.monotonic()
    with open(row["archive"], "rb") as archive:
        subprocess.run([*host.ssh_command().split(), "cat >/var/tmp/bench-archive"], stdin=archive, check=True)
    row["copy_seconds"] = time.monotonic() - started
    host_exec(host, "rm -f /var/tmp/bench-archive")
    argv = archives.CODECS[codec].decompress or ("gzip", "-dc")
    started = time.monotonic()
    with open(row["archive"], "rb") as archive:
        subprocess.run(argv, stdin=archive, stdout=subprocess.DEVNULL, check=True)
    row["decompress_seconds"] = time.monotonic() - started
    row["image_bytes"] = int(inspect(tag, "{{.Size}}"))
    row["codec_seconds"] = row["save_seconds"] + row["copy_seconds"] + row["decompress_seconds"]
    log(
        f"{codec}: save {row['save_seconds']:.0f} s, {row['archive_bytes'] / 2**30:.2f} GiB, "
        f"copy {row['copy_seconds']:.0f} s, decompress {row['decompress_seconds']:.0f} s"
    )
    return row


def measure(fleet: Fleet, data: dict, tree_a: Path, tree_b: Path, args) -> dict:
    found: dict = {}
    tag = built(tree_a, data)
    found["tag"] = tag
    found["image_bytes"] = int(inspect(tag, "{{.Size}}"))
    found["slices"] = slice_costs(tag)
    if "codecs" in args.phases:
        room(12)
        (host,) = start_hosts(fleet, 1)
        found["codecs"] = []
        for codec in args.codecs:
            found["codecs"].append(codec_row(host, tree_a, tag, codec))
            Path(found["codecs"][-1]["archive"]).unlink()
        fleet.remove([host])
    codec = (
        args.ship_codec
        or min(found.get("codecs") or [{"codec": "gzip", "codec_seconds": 0}], key=lambda r: r["codec_seconds"])[
            "codec"
        ]
    )
    if "ship" in args.phases:
        found["ship_codec"] = codec
        room(26)
        (host,) = start_hosts(fleet, 1)
        found["ship_first"] = deploy([host], data, tree_a, codec=codec)
        log(f"ship ({codec}), first: {found['ship_first']}")
        shipped = deploy([host], data, tree_b)
        new_tag = env_tag(host)
        new_id = inspect(new_tag, "{{.Id}}")
        archive = archives.archive_path(new_id, tree_b)
        found["ship_bump"] = shipped | {"tag": new_tag}
        found["bump_layers"] = changed_layers(tag, new_tag, archive)
        assert host_exec(host, f"docker image inspect --format '{{{{.Id}}}}' {new_tag}").stdout.strip() == new_id
        log(f"ship, bump: {found['ship_bump']}")
        fleet.remove([host])
        for tree in (tree_a, tree_b):
            shutil.rmtree(tree / "build" / "images", ignore_errors=True)
    if "registry" in args.phases:
        os.environ[archives.CODEC_ENV] = codec
        room(32)
        registry, puller = start_hosts(fleet, 2)
        mode = {**data, "image_delivery": "registry", "image_registry": f"{bridge_ip(registry)}:{REGISTRY_PORT}"}
        groups = {"registry": [registry]}
        found["registry_first"] = deploy([registry, puller], mode, tree_a, groups=groups)
        log(f"registry, first: {found['registry_first']}")
        found["registry_bump"] = deploy([registry, puller], mode, tree_b, groups=groups)
        log(f"registry, bump: {found['registry_bump']}")
        found["registry_hosts"] = {"registry": registry.name, "puller": puller.name}
        fleet.remove([registry, puller])
    return found


def built(tree: Path, data: dict) -> str:
    """The image of data's profile as the deploy from tree names it, built with the test wheel cache."""
    script = (
        "import json, sys; from labfleet.image import build_image, controller_settings, image_tag; "
        "from tests.e2e.harness.runner import controller_ca_certificates; "
        "d = json.loads(sys.argv[1]); "
        "s = controller_settings(image_profile=d['image_profile'], base_image=d['base_image'], "
        "extra_ca_certificates=controller_ca_certificates()); "
        "build_image(s); print(image_tag(s))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(data)], cwd=tree, capture_output=True, text=True, check=True
    )
    return done.stdout.strip().splitlines()[-1]


def markdown(results: dict) -> str:
    gib, mib = 2**30, 2**20
    info = results.get("machine", {})
    lines = [
        SECTION,
        "",
        "Written by `./run bench delivery_large` (bench/delivery_large.py); do not edit by hand.",
        "",
        f"Measured {info.get('date')} on {info.get('cores')} cores shared with other work (controller and test "
        f"hosts on one machine, so a copy is SSH over loopback, bounded by CPU, not by a LAN), Docker "
        f"{info.get('docker')} on the controller and 26.1 (Debian 13's docker.io) on the hosts; one round per "
        f"row; the benchmark took {info.get('bench_minutes')} min. Not measured: 3 hosts of this image at once "
        "(each host loading it holds about twice its size while the engine unpacks the archive, 3 hosts about "
        "50 GB, more than this shared disk had free).",
        "",
    ]
    codecs = results.get("codecs", [])
    image = int(results.get("image_bytes") or (codecs[0]["image_bytes"] if codecs else 0))
    if codecs:
        base = next((row["codec_seconds"] for row in codecs if row["codec"] == "gzip"), codecs[0]["codec_seconds"])
        lines += [
            f"### Compression of the whole image ({image / gib:.2f} GiB in the engine)",
            "",
            "What the codec changes in a delivery: the controller's `docker save` and compression, the copy of "
            "the archive over SSH to one host, and its decompression on the host (timed on the same CPUs). The "
            "engine's unpacking and registering of the layers that follows is the same for every codec (see the "
            "first delivery below). Ratios against gzip level 1 (the default until this run) in the same run.",
            "",
            "| codec | archive | ÷ image | save + compress | copy | decompress | sum | ÷ gzip -1 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in codecs:
            lines.append(
                f"| {row['codec']} | {row['archive_bytes'] / gib:.2f} GiB | {row['archive_bytes'] / image:.2f} "
                f"| {row['save_seconds']:.0f} s | {row['copy_seconds']:.0f} s | {row['decompress_seconds']:.0f} s "
                f"| {row['codec_seconds']:.0f} s | **{row['codec_seconds'] / base:.2f}x** |"
            )
        lines.append("")
    bump, layers = results.get("bump", {}), results.get("bump_layers", {})
    rows = []
    for key, mode, step in (
        ("ship_first", f"ship ({results.get('ship_codec')})", "first delivery"),
        ("ship_bump", f"ship ({results.get('ship_codec')})", "one-package bump"),
        ("registry_first", "registry", "first delivery"),
        ("registry_bump", "registry", "one-package bump"),
    ):
        row = results.get(key)
        if not row:
            continue
        if mode == "registry":
            names = results["registry_hosts"]
            received, extra = (
                row["bytes"][names["puller"]],
                f" (registry host: {row['bytes'][names['registry']] / mib:.1f} MiB)",
            )
        else:
            (received,), extra = row["bytes"].values(), ""
        rows.append(
            f"| {mode} | {step} | 1 | {row['seconds']:.0f} s | {received / mib:.1f} MiB{extra} "
            f"| **{received / image:.3f}** |"
        )
    if rows:
        lines += [
            f"### First delivery and a real one-package bump: {bump.get('package')} {bump.get('from')} -> "
            f"{bump.get('to')} (slice {bump.get('slot')} of 20)",
            "",
        ]
        if layers:
            lines += [
                f"The bump gives layer {layers['first_changed_layer']} of {layers['layers']} and up new chain ids. "
                f"The layers whose diff ids the old image lacks hold {layers['changed_bytes'] / mib:.1f} MiB; "
                f"everything from the first changed layer up, which `docker pull` downloads again (it skips a "
                f"layer only when it has it on top of the same layers below), holds "
                f"{layers['above_first_change_bytes'] / mib:.1f} MiB (uncompressed sizes). Time is the whole "
                "deploy, the controller's build and save of the new image included. Goal: a bump outside the "
                "torch closure moves at most 5% of the image per host.",
                "",
            ]
        lines += [
            "Notes. `registry`'s first delivery moves the registry's blobs, which `docker push` compresses with "
            "gzip (the pulling host's bytes), while the registry host receives the zstd archive by `ship`. After "
            "a bump in slice k, `docker pull` downloads every layer from the first changed one up, compressed, "
            "whatever the host holds (it looks a layer up by chain id); `ship` sends only the layers whose diff "
            "ids the host lacks, and copies the others from the host's own images when they come to at least 2% "
            "of the image (smaller ones travel). For the measured bump in slice 18 both move the same bytes: above "
            "it lie only slices 19 and 20 (81 MB). For a bump lower down they differ: see the computed table.",
            "",
        ]
        lines += ["| mode | step | hosts | time | received per host | ÷ image |", "|---|---|---:|---:|---:|---:|"]
        lines += [*rows, ""]
    slices = results.get("slices") or []
    if slices:
        lines += [
            "### A bump in each slice above torch's (computed, not measured)",
            "",
            "What `ship` sends (the selection of labfleet/archives.py run on the image's own layers, with the "
            "bumped slice's two layers and the top layer new) and what moving by chain ids sends, `docker pull` "
            "in `registry` mode and `ship` before this change alike: every layer from the bumped one up. "
            "Uncompressed sizes, as parts of the image; the archive or the registry's blobs are about half.",
            "",
            "| bumped slice | its layers | ship sends | ÷ image | chain ids send | ÷ image |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for row in slices:
            image_size = row["image_bytes"]
            lines.append(
                f"| {row['slice']} | {row['slice_bytes'] / mib:.0f} MiB | {row['ship_bytes'] / mib:.0f} MiB "
                f"| {row['ship_bytes'] / image_size:.3f} | {row['chain_bytes'] / mib:.0f} MiB "
                f"| {row['chain_bytes'] / image_size:.3f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Put section at the end of path, in place of an earlier copy of it."""
    text = path.read_text() if path.exists() else ""
    if SECTION in text:
        text = text[: text.index(SECTION)]
    path.write_text(text.rstrip("\n") + "\n\n" + section)


if __name__ == "__main__":
    sys.exit(main())
