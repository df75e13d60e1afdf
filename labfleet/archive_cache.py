"""What the controller's cache of ship archives (build/images/) keeps.

Each change under container/ is a new image and a new archive (4-5 GB for pytorch), and the
partial archives written for hosts sit beside it. Nothing else removes them, so every save
of a new whole archive prunes the cache. Deploys from one checkout may run at once: a file
one of them is writing or about to copy must stay, hence the grace by modification time (a
deploy touches the archives it reuses).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

# The cache keeps the archives of the KEEP_ARCHIVES most recently used images that the
# controller's engine still has, and whatever was written or used in the last PRUNE_GRACE
# seconds (another deploy may be writing or copying it right now).
KEEP_ARCHIVES = 4
PRUNE_GRACE = 2 * 3600


def engine_image_ids() -> set[str] | None:
    """Every image id in the controller's engine; None where the engine cannot be asked."""
    result = subprocess.run(
        ["docker", "image", "ls", "--all", "--quiet", "--no-trunc"], capture_output=True, text=True, check=False
    )
    return set(result.stdout.split()) if result.returncode == 0 else None


def _image_key(name: str) -> str | None:
    """The image id prefix a cache file belongs to (archive_path's 16 hex digits), None for a
    file of another kind; a partial file (".<name>.<random>.partial") belongs to its target's."""
    if name.startswith(".") and name.endswith(".partial"):
        name = name[1:]
    key = name.split(".", 1)[0].split("-", 1)[0]
    return key if len(key) == 16 and all(c in "0123456789abcdef" for c in key) else None


def prune(directory: Path, engine_ids: set[str] | None, keep: Path, now: float | None = None) -> list[Path]:
    """Remove the cache files (whole and partial archives, indexes, leftover partial files) of
    images the engine no longer has or that are not among the KEEP_ARCHIVES most recently used,
    never keep's image nor a file touched in the last PRUNE_GRACE seconds. engine_ids None: the
    engine could not be asked, nothing is removed. Returns what was removed."""
    if engine_ids is None:
        return []
    now = time.time() if now is None else now
    present = {image_id.removeprefix("sha256:")[:16] for image_id in engine_ids}
    files: dict[str, list[tuple[Path, float]]] = {}
    for path in directory.iterdir():
        key = _image_key(path.name)
        with contextlib.suppress(OSError):  # another deploy may remove or rename it meanwhile
            if key is not None and path.is_file():
                files.setdefault(key, []).append((path, path.stat().st_mtime))
    used = {key: max(mtime for _, mtime in entries) for key, entries in files.items()}
    kept = {_image_key(keep.name)}
    kept.update(sorted((key for key in used if key in present), key=lambda key: used[key])[-KEEP_ARCHIVES:])
    removed: list[Path] = []
    for key, entries in files.items():
        for path, mtime in entries:
            # A partial file that old is a dead deploy's: no save writes for that long.
            if now - mtime >= PRUNE_GRACE and (key not in kept or path.name.endswith(".partial")):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
