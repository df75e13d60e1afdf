"""The lab image: where its bytes are, against its floor and its anchors, and what a rebuild costs.

    ./run bench image                          # jupyter and pytorch-cu128: sizes, packages, layers
    ./run bench image --rebuild                # + a cold (--no-cache) pytorch-cu128 build and a one-package bump
    ./run bench image --lock pytorch-cu130     # another lock (its wheels are fetched into the test cache first)
    ./run bench image --up                     # + time to healthy and smoke_test.py in each image
    ./run bench image --report                 # IMAGE.md again from image.json

Every image is built as the tests build it (labfleet.image.build_image on the harness's
Debian 13 base, wheels from the test wheel cache, tests/e2e/harness/wheels.py), so a build
whose layers the engine already has takes seconds, and a timed build measures the build
(hash checks, unpacking, bytecode), not a download. In each built image SURVEY
(bench/image_sizes.py) sums every distribution's RECORD files, as installed, per package: the
floor of issue 16 is that sum plus the base image, and the goal is the image within 1.05x of it.
The layers are RootFS.Layers with `docker history`'s sizes (uncompressed), and the packages
of the lock slice each one installs.

--rebuild builds the first pytorch lock with --no-cache (the cold build; minutes of every
core), then again unchanged, then from a copy of the context with one small package of a top
slice pinned to another version (bench/bump.py): the rebuild's time against the cold one
(goal: at most 10%), and the layers and bytes whose digests differ from the cold image's.

Results go to bench/image.json (per lock, kept across runs) and bench/IMAGE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from bench import image_sizes
from bench.bump import DEFAULT_PACKAGE, DEFAULT_VERSION, bumped_context
from labfleet import image
from tests.e2e.harness import wheels
from tests.e2e.harness.images import base_image
from tests.e2e.harness.runner import controller_ca_certificates

LABEL = "labfleet.bench.image"
# Not the deploy's repository: a rebuild under the deploy's tag gives it a new image id, and
# the lab's next deploy would copy that image to every host again.
REPOSITORY = "labfleet-bench/jupyterlab"
HERE = Path(__file__).parent
RESULTS = HERE / "image.json"
REPORT = HERE / "IMAGE.md"
GB = 1000**3
MB = 1000**2
DEFAULT_LOCKS = ("jupyter", "pytorch-cu128")
FLOOR_GOAL = 1.05
REBUILD_GOAL = 0.10
HEALTH_TIMEOUT_S = 180
COLD_TIMEOUT_S = 7200
BUMP_ROUNDS = 3

# Published sizes of comparable images, each with where it was published. All are the
# uncompressed size an engine reports for the pulled or built image (`docker images`), the
# measure of our own `.Size`; a registry's compressed download is smaller (about half for
# CUDA wheels, which compress poorly).
ANCHORS = [
    {
        "name": "docker-stacks pytorch-notebook, cuda12 (quay.io/jupyter/pytorch-notebook:996fae1248fc, 2024-05-16)",
        "bytes": int(8.82 * GB),
        "kind": "uncompressed, `docker images` on docker-stacks' build runner",
        "source": "https://github.com/jupyter/docker-stacks/wiki/x86_64-cuda12-pytorch-notebook-996fae1248fc",
    },
    {
        "name": "docker-stacks pytorch-notebook, cuda13 (quay.io/jupyter/pytorch-notebook:1887c69601ed, 2026-09-01)",
        "bytes": int(8.56 * GB),
        "kind": "uncompressed, `docker images` on docker-stacks' build runner",
        "source": "https://github.com/jupyter/docker-stacks/wiki/x86_64-cuda13-pytorch-notebook-1887c69601ed",
    },
    {
        "name": "NGC PyTorch (nvcr.io/nvidia/pytorch:23.03-py3)",
        "bytes": 20 * GB,
        "kind": 'uncompressed, approximate ("~20GB"), as a user reported it',
        "source": "https://github.com/d4l3k/torchdrive/pull/4",
    },
    {
        "name": "NGC PyTorch (nvcr.io/nvidia/pytorch, 2024)",
        "bytes": 22 * GB,
        "kind": 'uncompressed, approximate ("22G"), as a user reported it',
        "source": "https://github.com/hiyouga/LlamaFactory/issues/4974",
    },
]


def docker(*args: str, check: bool = True, timeout: float = 600) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def profile_and_cuda(lock: str) -> tuple[str, str]:
    """pytorch-cu128 -> (pytorch, 12.8); jupyter -> (jupyter, the default line)."""
    profile, _, line = lock.partition("-cu")
    if not line:
        return profile, image.controller_settings().cuda
    return profile, f"{line[:-1]}.{line[-1]}"


def settings_for(lock: str, base: str):
    profile, cuda = profile_and_cuda(lock)
    settings = image.controller_settings(
        image_profile=profile, base_image=base, cuda=cuda, extra_ca_certificates=controller_ca_certificates()
    )
    built = image.build_args(settings)["LOCK"]
    if built != lock:
        raise SystemExit(f"lock {lock}: the settings build {built}; is container/requirements/{lock}.txt there?")
    return settings


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", tag).strip())


def image_layers(tag: str) -> list[image_sizes.Layer]:
    history = docker("history", "--no-trunc", "--human=false", "--format", "{{.Size}}\t{{.CreatedBy}}", tag)
    rootfs = json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", tag))
    return image_sizes.layers(history, rootfs)


@functools.cache
def slot_of() -> object:
    return runpy.run_path(str(image.CONTEXT_DIR / "layer_locks.py"))["slot"]


def survey(tag: str, base: str) -> dict:
    """Sizes of one built image: per package, per layer, and its floor."""
    answer = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "/opt/venv/bin/python", tag,
         "-c", image_sizes.SURVEY],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if answer.returncode != 0:
        raise SystemExit(f"the survey failed in {tag}: {answer.stderr.strip()[-800:]}")
    found = image_sizes.parse_survey(answer.stdout)
    slot = slot_of()
    packages = [{**package, "slot": slot(package["name"])} for package in found["packages"]]  # type: ignore[operator]
    floor = image_sizes.floor(found, image_size(tag), image_size(base))
    return {
        "python": found["python"],
        "floor": {**asdict(floor), "floor": floor.floor, "ratio": round(floor.ratio, 4), "rest": floor.rest},
        "packages": sorted(packages, key=lambda p: -p["bytes"]),
        "layers": [asdict(layer) for layer in image_layers(tag)],
    }


def smoke_and_health(tag: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as workdir:
        api, healthy = time_to_healthy(tag, Path(workdir))
    # On a GPU host add --gpus all; here it shows the CPU path.
    smoke = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python3", tag, "/opt/labfleet/smoke_test.py"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    print(smoke.stdout + smoke.stderr, end="")
    return {
        "up_to_api_s": round(api, 1),
        "up_to_healthy_s": round(healthy, 1),
        "smoke_test": "passed" if smoke.returncode == 0 else f"failed ({smoke.returncode})",
    }


def time_to_healthy(tag: str, workdir: Path) -> tuple[float, float]:
    """Seconds from `docker run` to the first /api answer, and to the engine's `healthy`."""
    token = workdir / "jupyter_token"
    token.write_text("bench-token\n")
    token.chmod(0o644)
    started = time.monotonic()
    container = docker(
        "run", "--detach", "--label", f"{LABEL}=1", "--init", "--security-opt", "no-new-privileges:true",
        "--env", "NB_USER=bench", "--env", "NB_UID=1000", "--env", "NB_GID=1000",
        "--env", "JUPYTER_TOKEN_FILE=/run/secrets/jupyter_token",
        "--mount", f"type=bind,source={token},target=/run/secrets/jupyter_token,readonly",
        "--publish", "127.0.0.1::8888", tag,
    ).strip()  # fmt: skip
    try:
        port = int(docker("port", container, "8888/tcp").split(":")[-1].split()[0])
        api = None
        deadline = started + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if api is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api", timeout=2):
                        api = time.monotonic() - started
                except OSError:
                    pass
            if docker("inspect", "--format", "{{.State.Health.Status}}", container).strip() == "healthy":
                return api or float("nan"), time.monotonic() - started
            time.sleep(0.5)
        raise SystemExit(f"{tag} did not turn healthy within {HEALTH_TIMEOUT_S} s")
    finally:
        docker("rm", "--force", container, check=False)


def timed_build(settings, url: str, **options) -> tuple[image.Build, dict]:
    load = os.getloadavg()[0]
    build = image.build_image(
        settings, labels={LABEL: "1"}, repository=REPOSITORY, wheels=url, timeout=COLD_TIMEOUT_S, **options
    )
    return build, {
        "seconds": round(build.seconds, 1),
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def image_id(tag: str) -> str | None:
    answer = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False).strip()
    return answer or None


def remove_if_dangling(identifier: str | None) -> None:
    """An image of ours that a --no-cache build untagged (never another's: only ids we saw under our tag)."""
    if identifier and not json.loads(
        docker("image", "inspect", "--format", "{{json .RepoTags}}", identifier, check=False) or "null"
    ):
        docker("rmi", identifier, check=False)


def rebuild(lock: str, base: str, url: str, rounds: int = BUMP_ROUNDS) -> dict:
    """Cold build, unchanged rebuild and one-package bump of lock; the figures of the rebuild goal.

    The bump is rebuilt `rounds` times against the one cold build, its image removed between
    rounds (which removes its own layers, so each round rebuilds them); the median counts.
    """
    settings = settings_for(lock, base)
    tag = image.image_tag(settings, repository=REPOSITORY)
    before = image_id(tag)
    print(f"{lock}: cold build (--no-cache) of {tag} ...", flush=True)
    cold, cold_figures = timed_build(settings, url, no_cache=True)
    remove_if_dangling(before)
    print(f"{lock}: cold {cold_figures['seconds']} s; unchanged rebuild ...", flush=True)
    _, unchanged = timed_build(settings, url, force=True, cache_from=[cold.tag])
    cold_layers = image_layers(cold.tag)
    figures = []
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-bump-") as workdir:
        bump = bumped_context(DEFAULT_PACKAGE, DEFAULT_VERSION, Path(workdir), wheel_dir=wheels.cache_dir(), lock=lock)
        for number in range(1, rounds + 1):
            print(
                f"{lock}: rebuild {number}/{rounds} with {bump.package} {bump.old_version} -> {bump.new_version} "
                f"(layer {bump.slot}) ...",
                flush=True,
            )
            # The same settings: the context differs, and with it the tag.
            bumped, round_figures = timed_build(settings, url, context=bump.context, cache_from=[cold.tag])
            figures.append(round_figures)
            if number < rounds:
                docker("rmi", bumped.tag)
    installed = docker(
        "run", "--rm", "--network", "none", "--entrypoint", "/opt/venv/bin/python", bumped.tag, "-c",
        f"import importlib.metadata as m; print(m.version({bump.package!r}))",
    ).strip()  # fmt: skip
    if installed != bump.new_version:
        raise SystemExit(f"the bumped image has {bump.package} {installed}, not {bump.new_version}")
    difference = image_sizes.compare(cold_layers, image_layers(bumped.tag))
    docker("rmi", bumped.tag, check=False)
    seconds = statistics.median(round_figures["seconds"] for round_figures in figures)
    return {
        "lock": lock,
        "cold": cold_figures,
        "unchanged": unchanged,
        "bump": {
            "seconds": seconds,
            "rounds": figures,
            "package": bump.package,
            "from": bump.old_version,
            "to": bump.new_version,
            "slot": bump.slot,
            "ratio_to_cold": round(seconds / cold_figures["seconds"], 4),
            "layers_changed": len(difference.changed),
            "layers_total": difference.total,
            "bytes_changed": difference.changed_bytes,
            "share_of_image": round(difference.share, 6),
            "changed": [asdict(layer) for layer in difference.changed],
        },
    }


def bench_lock(lock: str, base: str, url: str, up: bool) -> dict:
    settings = settings_for(lock, base)
    print(f"{lock}: building (from the engine's cache where it has the layers) ...", flush=True)
    build, figures = timed_build(settings, url)
    result = {
        "lock": lock,
        "tag": build.tag,
        "base": base,
        "build": figures if build.built else "already built",
        **survey(build.tag, base),
    }
    if up:
        result.update(smoke_and_health(build.tag))
    return result


@contextlib.contextmanager
def wheel_cache(locks: list[str], base: str) -> Iterator[str]:
    files = [image.CONTEXT_DIR / "requirements" / f"{lock}.txt" for lock in locks]
    print(f"wheel cache: {', '.join(f.name for f in files)} (downloads only what is missing) ...", flush=True)
    with wheels.serve(wheels.fill(files, base)) as url:
        yield url


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"locks": {}, "rebuild": None}


def save_results(results: dict) -> None:
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lock", action="append", help="lock to build and measure (repeatable; default: jupyter, pytorch-cu128)"
    )
    parser.add_argument(
        "--rebuild", action="store_true", help="also the cold build and a one-package bump of the first pytorch lock"
    )
    parser.add_argument("--bump-rounds", type=int, default=BUMP_ROUNDS, help="rebuilds of the bump (median)")
    parser.add_argument("--up", action="store_true", help="also time each image to healthy and run its smoke test")
    parser.add_argument("--keep", action="store_true", help="keep the built images")
    parser.add_argument("--report", action="store_true", help="only write IMAGE.md from image.json")
    args = parser.parse_args()
    results = load_results()
    if not args.report:
        base = base_image("trixie")
        locks = args.lock or list(DEFAULT_LOCKS)
        machine = {
            "cores": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        with wheel_cache(locks, base) as url:
            if args.rebuild:
                target = next((lock for lock in locks if lock.startswith("pytorch")), locks[0])
                results["rebuild"] = {**rebuild(target, base, url, args.bump_rounds), **machine}
                save_results(results)
            for lock in locks:
                results["locks"][lock] = {**bench_lock(lock, base, url, args.up), **machine}
                save_results(results)
                if not args.keep:
                    docker("rmi", results["locks"][lock]["tag"], check=False)
    from bench.image_report import write_report

    write_report(results, REPORT, ANCHORS)
    print(REPORT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
