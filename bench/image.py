"""The JupyterLab image against its anchors: size per profile, cold/warm build, up to healthy.

    ./run bench image                    # the jupyter profile
    ./run bench image --profile pytorch     # the CUDA torch stack (GBs from PyPI)
    ./run bench image --profile pytorch --cuda 13.0
    ./run bench image --base-image ubuntu:24.04@sha256:...   # a base the engine has

Each profile is built cold (--no-cache) and again warm (nothing changed: every layer from the
cache), then started as compose starts it, timing `docker run` to the first /api answer and to
the engine's `healthy` (which the 30 s health interval dominates on engines older than 25,
which lack start_interval), and smoke_test.py is run in it. Sizes are `docker image inspect .Size`, next to the anchors'
published sizes: the goal is at most 0.6x docker-stacks' pytorch-notebook for the same stack.

Without --base-image the test harness's debootstrap Debian 13 base is used: there may be no
registry to pull the default Ubuntu base from. A profile with no lock for the CUDA line is
skipped with the reason (the cpu profile needs PyTorch's CPU index to be locked).
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from labfleet import image
from tests.e2e.harness.images import base_image

LABEL = "labfleet.bench.image"
# Not the deploy's repository: a rebuild under the deploy's tag gives it a new image id, and
# the lab's next deploy would copy that image to every host again.
REPOSITORY = "labfleet-bench/jupyterlab"
GB = 1000**3
# Published compressed-on-disk sizes, as `docker images` shows them after a pull.
ANCHORS = {
    "docker-stacks pytorch-notebook (cuda12)": 10.0 * GB,
    "NGC PyTorch": 20.0 * GB,
}
TARGET_RATIO = 0.6
HEALTH_TIMEOUT_S = 180
LOCAL_CA_GLOB = "/usr/local/share/ca-certificates/*.crt"


def docker(*args: str, check: bool = True, timeout: float = 300) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def lock_for(profile: str, cuda: str) -> Path | None:
    requirements = image.CONTEXT_DIR / "requirements"
    for name in (f"{profile}-cu{cuda.replace('.', '')}.txt", f"{profile}.txt"):
        if (requirements / name).is_file():
            return requirements / name
    return None


def default_base() -> str:
    # The harness builds (once) and caches a plain Debian 13 minbase image.
    return base_image("trixie")


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


def bench_profile(profile: str, base: str, cuda: str, keep: bool) -> dict | None:
    lock = lock_for(profile, cuda)
    if lock is None:
        print(f"{profile}: skipped, no lock for CUDA {cuda} (see container/relock.sh {profile})")
        return None
    cas = sorted(glob.glob(LOCAL_CA_GLOB))
    settings = image.controller_settings(image_profile=profile, base_image=base, cuda=cuda, extra_ca_certificates=cas)
    tag = image.image_tag(settings, repository=REPOSITORY)
    print(f"{profile}: building {tag} from {lock.name} on {base} ...", flush=True)
    build = functools.partial(image.build_image, settings, labels={LABEL: "1"}, repository=REPOSITORY)
    cold = build(no_cache=True, timeout=7200)
    warm = build(force=True, cache_from=[cold.tag], timeout=3600)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", cold.tag).strip())
    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as workdir:
        api, healthy = time_to_healthy(cold.tag, Path(workdir))
    # On a GPU host add --gpus all; here it shows the CPU path.
    smoke = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python3", cold.tag, "/opt/labfleet/smoke_test.py"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    print(smoke.stdout + smoke.stderr, end="")
    if not keep:
        docker("rmi", cold.tag, check=False)
    return {
        "profile": profile,
        "lock": lock.name,
        "tag": cold.tag,
        "size_bytes": size,
        "cold_build_s": round(cold.seconds, 1),
        "warm_build_s": round(warm.seconds, 1),
        "up_to_api_s": round(api, 1),
        "up_to_healthy_s": round(healthy, 1),
        "smoke_test": "passed" if smoke.returncode == 0 else f"failed ({smoke.returncode})",
    }


def report(results: list[dict]) -> None:
    print()
    print(f"{'profile':<10} {'size':>8} {'cold':>8} {'warm':>7} {'to /api':>8} {'healthy':>8}  vs anchors")
    for r in results:
        ratios = ", ".join(f"{r['size_bytes'] / size:.2f}x {name}" for name, size in ANCHORS.items())
        print(
            f"{r['profile']:<10} {r['size_bytes'] / GB:>6.2f}GB {r['cold_build_s']:>7.1f}s {r['warm_build_s']:>6.1f}s "
            f"{r['up_to_api_s']:>7.1f}s {r['up_to_healthy_s']:>7.1f}s  {ratios}"
        )
    print(f"goal: at most {TARGET_RATIO}x docker-stacks' pytorch-notebook for the same torch stack")
    print(json.dumps(results, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="append", help="profile to build (repeatable; default: jupyter)")
    parser.add_argument("--base-image", help="BASE_IMAGE the engine already has (default: the harness's Debian 13)")
    parser.add_argument("--cuda", default=image.controller_settings().cuda)
    parser.add_argument("--keep", action="store_true", help="keep the built images")
    args = parser.parse_args()
    base = args.base_image or default_base()
    results = [bench_profile(p, base, args.cuda, args.keep) for p in args.profile or ["jupyter"]]
    report([r for r in results if r])
    return 0


if __name__ == "__main__":
    sys.exit(main())
