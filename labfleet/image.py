"""The lab image's identity and build: a tag computed on the controller that every host is held to.

The build context is container/ plus certs/ holding the extra_ca_certificates, so labs behind
a TLS-inspecting proxy can build; the tag covers both and the build arguments.
"""

from __future__ import annotations

import hashlib
import os
import runpy
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from labfleet import progress
from labfleet.certs import host_file_name
from labfleet.model import lock_file
from labfleet.settings import REPO_ROOT, Settings, build

CONTEXT_DIR = REPO_ROOT / "container"
REPOSITORY = "labfleet/jupyterlab"
IGNORED = {"__pycache__", ".pytest_cache"}
# The CA files' place in the context mirrors their place in the image: the Dockerfile copies
# certs/ to /, which leaves no directory with the time of the build (a layer's digest covers it).
CERTS_DIR = "certs/usr/local/share/ca-certificates/labfleet"
TAG_LABEL = "org.labfleet.image.tag"
BUILD_TIMEOUT_S = 3600
LOG_TAIL_LINES = 30
WHEELS_ENV = "LABFLEET_BUILD_WHEELS"
SOURCE_DATE_EPOCH = 1767225600  # the Dockerfile's: the one time of every file in the image


class ImageBuildError(RuntimeError):
    """The engine could not build the image; the message says which tag, why, and what to do."""


@dataclass(frozen=True)
class Build:
    """One build_image call: the tag, whether the engine had to build it, and its output."""

    tag: str
    built: bool
    seconds: float = 0.0
    log: str = ""


def controller_settings(**overrides) -> Settings:
    """group_data/all.py's defaults with overrides, validated: for builds outside a deploy (bench, tests).

    The image depends on no jupyter user; one is named only because settings require one.
    """
    defaults = runpy.run_path(str(REPO_ROOT / "group_data" / "all.py"))
    raw = {key: value for key, value in defaults.items() if not key.startswith("__")}
    raw["jupyter_user"] = "labfleet"
    raw.update(overrides)
    return build("controller", raw)


def build_args(settings: Settings) -> dict[str, str]:
    """The Dockerfile's arguments. The lock stands for the CUDA line: profiles locked once
    (jupyter) give one image, and one tag, for every line."""
    lock = lock_file(settings.image_profile, settings.cuda)
    if lock is None:  # checks.py refuses this before any build; a bench or a test may not
        raise ImageBuildError(
            f"profile {settings.image_profile} has no lock for CUDA {settings.cuda}: create it with "
            f"container/relock.sh {settings.image_profile} --cuda {settings.cuda}"
        )
    return {"BASE_IMAGE": settings.base_image, "PROFILE": settings.image_profile, "LOCK": lock.stem}


def _context_files(root: Path) -> list[Path]:
    return sorted(
        path for path in root.rglob("*") if path.is_file() and not IGNORED.intersection(path.relative_to(root).parts)
    )


def _is_executable(path: Path) -> bool:
    return bool(path.stat().st_mode & 0o111)


def _file_digest(name: str, path: Path) -> bytes:
    # Content only: the Dockerfile sets the modes it needs, so a checkout or a synced copy
    # that lost the executable bits builds the same image under the same tag.
    return name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest()


@cache
def _context_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in _context_files(root):
        digest.update(_file_digest(path.relative_to(root).as_posix(), path))
    return digest.hexdigest()


def _certificate_files(settings: Settings) -> dict[str, Path]:
    return {f"{CERTS_DIR}/{host_file_name(path)}": Path(path) for path in settings.extra_ca_certificates}


def context_files(settings: Settings, context: Path = CONTEXT_DIR) -> dict[str, Path]:
    """Every file of the build context: its path inside the context -> the file to copy."""
    files = {path.relative_to(context).as_posix(): path for path in _context_files(context)}
    files.update(_certificate_files(settings))
    return files


def image_tag(settings: Settings, context: Path = CONTEXT_DIR, repository: str = REPOSITORY) -> str:
    """`labfleet/jupyterlab:<profile>-<12 hex>` over the build context and build args.

    The same inputs give the same tag on every controller, so a host whose tag differs
    was built from something else. Benchmarks and tests that rebuild on purpose pass their
    own repository: a rebuild under the deploy's tag gives it a new image id, and the next
    deploy would then copy that to every host.
    """
    digest = hashlib.sha256(_context_digest(context).encode())
    for name, path in sorted(_certificate_files(settings).items()):
        digest.update(_file_digest(name, path))
    for key, value in sorted(build_args(settings).items()):
        digest.update(f"{key}={value}\0".encode())
    return f"{repository}:{settings.image_profile}-{digest.hexdigest()[:12]}"


def assemble_context(settings: Settings, destination: Path, context: Path = CONTEXT_DIR) -> Path:
    """Copy the build context (container/ plus certs/) into an empty directory; return it.

    Modes are normalised to 755/644 and times to SOURCE_DATE_EPOCH, so neither the engine's
    layer cache nor a layer's digest depends on the controller's umask or clock.
    """
    destination.mkdir(parents=True, exist_ok=True)
    if any(destination.iterdir()):
        raise ValueError(f"build context {destination} must be empty")
    for name, source in context_files(settings, context).items():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        target.chmod(0o755 if _is_executable(source) else 0o644)
        # COPY keeps a file's time, and a layer's digest covers it.
        os.utime(target, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    for directory, _, _ in os.walk(destination):
        os.utime(directory, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    return destination


def image_exists(tag: str, engine_cmd: Sequence[str] = ("docker",)) -> bool:
    result = subprocess.run([*engine_cmd, "image", "inspect", tag], capture_output=True, check=False)
    return result.returncode == 0


def _build_env(engine_cmd: Sequence[str]) -> dict[str, str]:
    env = dict(os.environ)
    if "DOCKER_BUILDKIT" not in env:
        # A CLI without buildx refuses to build unless told to use the legacy builder.
        probe = subprocess.run([*engine_cmd, "buildx", "version"], capture_output=True, check=False)
        if probe.returncode != 0:
            env["DOCKER_BUILDKIT"] = "0"
    return env


def build_image(
    settings: Settings,
    engine_cmd: Sequence[str] = ("docker",),
    *,
    context: Path = CONTEXT_DIR,
    labels: Mapping[str, str] | None = None,
    force: bool = False,
    no_cache: bool = False,
    cache_from: Sequence[str] = (),
    timeout: float = BUILD_TIMEOUT_S,
    repository: str = REPOSITORY,
    wheels: str | None = None,
) -> Build:
    """Build the image under image_tag(settings) with the local engine; skip it when the tag exists.

    + settings: the host's settings (profile, cuda, base_image, extra_ca_certificates)
    + engine_cmd: the engine's command line, e.g. ("docker",) or ("sudo", "docker")
    + context: the container/ directory to build from
    + labels: extra image labels (tests mark their images with them)
    + force: run the build even when the tag exists (the engine's layer cache still applies)
    + no_cache: build every layer anew (implies force), as for a cold-build measurement
    + cache_from: images whose layers alone serve as cache (after a no_cache build the legacy
      builder may otherwise pick an older copy of a layer and miss the rest of the chain)
    + timeout: seconds before the build is abandoned
    + repository: the tag's repository (see image_tag)
    + wheels: a find-links URL on this machine that holds every wheel of the profile's lock
      (default: $LABFLEET_BUILD_WHEELS; the end-to-end tests' one wheel cache): the build reads
      them from there instead of the index, hashes still checked, so the image and its tag are
      the ones the index gives. The build runs on the host's network to reach 127.0.0.1.

    **Examples:**

    .. code:: python

        build = build_image(settings)
        print(build.tag, "built" if build.built else "already there")
    """
    tag = image_tag(settings, context, repository)
    if not (force or no_cache) and image_exists(tag, engine_cmd):
        return Build(tag=tag, built=False)
    argv = [*engine_cmd, "build", "--force-rm", "--tag", tag, "--label", f"{TAG_LABEL}={tag}"]
    if no_cache:
        argv.append("--no-cache")
    for source in cache_from:
        argv += ["--cache-from", source]
    for key, value in sorted((labels or {}).items()):
        argv += ["--label", f"{key}={value}"]
    for key, value in sorted(build_args(settings).items()):
        argv += ["--build-arg", f"{key}={value}"]
    wheels = wheels or os.environ.get(WHEELS_ENV)
    if wheels:
        argv += ["--network", "host", "--build-arg", f"PIP_FIND_LINKS={wheels}", "--build-arg", "PIP_NO_INDEX=1"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="labfleet-context-") as directory:
        assemble_context(settings, Path(directory), context)
        try:
            returncode, log = progress.run_on_controller(
                [*argv, directory],
                f"Build {tag}",
                "steps",
                progress.build_step_answer,
                env=_build_env(engine_cmd),
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            raise ImageBuildError(
                f"building {tag} did not finish within {timeout:.0f} s; check the network to the package "
                "index (and extra_ca_certificates behind a TLS-inspecting proxy), then run the deploy again"
            ) from error
    if returncode != 0:
        tail = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
        raise ImageBuildError(
            f"building {tag} (profile {settings.image_profile}, CUDA {settings.cuda}, base {settings.base_image}) "
            f"failed with exit {returncode}; the build's last lines say why:\n{tail}"
        )
    return Build(tag=tag, built=True, seconds=time.monotonic() - started, log=log)
