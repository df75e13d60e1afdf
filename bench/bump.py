"""A real one-package bump of the image: a copy of container/ with one lock entry re-pinned.

The image and delivery benches measure what an update costs (a warm rebuild, the layers and
bytes shipped). A made-up change (a file of random bytes) says nothing about the layering: a
real update is a new pin of one package in the full lock, with the hash of its wheel, and the
slices cut again by container/layer_locks.py, exactly as relock.sh would leave them.

    from bench.bump import bumped_context
    bump = bumped_context("jupyterlab-pygments", "0.2.2", workdir, wheel_dir=wheels.cache_dir())
    build_image(settings, context=bump.context, repository="labfleet-bench/...", wheels=url)

The wheel is fetched (one `pip download --no-deps`) into wheel_dir, so a build that reads the
test wheel cache finds it there; the copy's lock names it by its sha256, as the index's would.
"""

from __future__ import annotations

import hashlib
import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from labfleet.image import CONTEXT_DIR, IGNORED

# The package the benches bump by default: pure Python, 22 kB, in a top slice (layer 18 of
# pytorch-cu128, with 19 and 20 above it rebuilt by the same bump), no other package pins it.
DEFAULT_PACKAGE = "jupyterlab-pygments"
DEFAULT_VERSION = "0.2.2"
DEFAULT_LOCK = "pytorch-cu128"
DOWNLOAD_TIMEOUT_S = 600
_REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


class BumpError(RuntimeError):
    """The bump cannot be made: the package is not in the lock, or its wheel cannot be fetched."""


@dataclass(frozen=True)
class Bump:
    """A bumped build context and what changed in it."""

    context: Path  # the copy of container/, to pass as build_image(context=...)
    lock: str  # the lock's stem, e.g. pytorch-cu128
    package: str
    old_version: str
    new_version: str
    wheel: Path  # the new version's wheel, in wheel_dir
    sha256: str
    slot: int  # the layer (1..20) the package is installed in


def canonical(name: str) -> str:
    """PEP 503's normal form, as layer_locks.py and pip compare names."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pin(lock_text: str, package: str, version: str, sha256: str) -> tuple[str, str]:
    """The lock with package's entry pinned to version and one wheel hash; and the old version.

    The entry's requirement and hash lines are replaced; its `# via` comments and every other
    line are kept byte for byte, so the other slices of the cut are unchanged.
    """
    wanted = canonical(package)
    lines = lock_text.splitlines(keepends=True)
    out: list[str] = []
    old: str | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        match = _REQUIREMENT.match(line)
        if match and canonical(match.group(1)) == wanted:
            if old is not None:
                raise BumpError(f"{package} is in the lock twice")
            old = match.group(2)
            out.append(f"{match.group(1)}=={version} \\\n    --hash=sha256:{sha256}\n")
            index += 1
            # The hash lines: indented and continuing the requirement (not the `# via` comments).
            while index < len(lines) and lines[index].lstrip().startswith("--hash="):
                index += 1
            continue
        out.append(line)
        index += 1
    if old is None:
        raise BumpError(f"{package} is not in the lock; pick a package the profile installs")
    return "".join(out), old


def fetch_wheel(package: str, version: str, wheel_dir: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download package==version's pure-Python wheel into wheel_dir (kept if already there)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{canonical(package).replace('-', '_')}-{version}-"
    found = [path for path in wheel_dir.glob("*.whl") if path.name.lower().startswith(prefix)]
    if not found:
        argv = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--only-binary=:all:", "--dest", str(wheel_dir), f"{package}=={version}",
        ]  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        found = [path for path in wheel_dir.glob("*.whl") if path.name.lower().startswith(prefix)]
        if result.returncode != 0 or not found:
            raise BumpError(f"pip could not download {package}=={version}: {result.stderr.strip()[-500:]}")
    pure = [path for path in found if path.name.endswith("-none-any.whl")]
    if not pure:
        raise BumpError(f"{package}=={version} has no pure-Python wheel ({found[0].name}); pick another package")
    return pure[0]


def layer_slot(package: str) -> int:
    """The layer layer_locks.py puts package in."""
    return runpy.run_path(str(CONTEXT_DIR / "layer_locks.py"))["slot"](package)


def bumped_context(
    package: str = DEFAULT_PACKAGE,
    version: str = DEFAULT_VERSION,
    workdir: Path | None = None,
    *,
    wheel_dir: Path,
    lock: str = DEFAULT_LOCK,
) -> Bump:
    """Copy container/ into workdir/container with package pinned to version in lock; return it.

    + package, version: the new pin; its wheel is fetched into wheel_dir
    + workdir: an existing directory (it must not hold a container/ yet)
    + wheel_dir: the wheel cache the build reads (tests/e2e/harness/wheels.py cache_dir())
    + lock: the lock's stem (requirements/<lock>.txt); its slices are re-cut in the copy
    """
    if workdir is None:
        raise BumpError("bumped_context needs a workdir to hold the copy")
    wheel = fetch_wheel(package, version, wheel_dir)
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    context = workdir / "container"
    shutil.copytree(CONTEXT_DIR, context, ignore=shutil.ignore_patterns(*IGNORED))
    lock_path = context / "requirements" / f"{lock}.txt"
    if not lock_path.is_file():
        raise BumpError(f"no lock {lock_path.name} in container/requirements")
    text, old = pin(lock_path.read_text(), package, version, sha256)
    lock_path.write_text(text)
    cut = subprocess.run(
        [sys.executable, str(context / "layer_locks.py"), str(lock_path)], capture_output=True, text=True, check=False
    )
    if cut.returncode != 0:
        raise BumpError(f"layer_locks.py failed on the bumped lock: {cut.stderr.strip()}")
    return Bump(
        context=context,
        lock=lock,
        package=canonical(package),
        old_version=old,
        new_version=version,
        wheel=wheel,
        sha256=sha256,
        slot=layer_slot(package),
    )
