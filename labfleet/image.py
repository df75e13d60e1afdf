"""The lab image's identity: a tag computed on the controller that every host is held to."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from labfleet.settings import REPO_ROOT, Settings

CONTEXT_DIR = REPO_ROOT / "container"
REPOSITORY = "labfleet/jupyterlab"
IGNORED = {"__pycache__", ".pytest_cache"}


def build_args(settings: Settings) -> dict[str, str]:
    return {"BASE_IMAGE": settings.base_image, "PROFILE": settings.image_profile, "CUDA": settings.cuda}


def _context_files(root: Path) -> list[Path]:
    return sorted(
        path for path in root.rglob("*") if path.is_file() and not IGNORED.intersection(path.relative_to(root).parts)
    )


@cache
def _context_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in _context_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def image_tag(settings: Settings, context: Path = CONTEXT_DIR) -> str:
    """`labfleet/jupyterlab:<profile>-<12 hex>` over the build context and build args.

    The same inputs give the same tag on every controller, so a host whose tag differs
    was built from something else.
    """
    digest = hashlib.sha256(_context_digest(context).encode())
    for key, value in sorted(build_args(settings).items()):
        digest.update(f"{key}={value}\0".encode())
    return f"{REPOSITORY}:{settings.image_profile}-{digest.hexdigest()[:12]}"
