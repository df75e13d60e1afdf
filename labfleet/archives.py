"""`docker save` archives on the controller, whole or without the layers a host already has.

A new tag usually changes only the top layers (a script, one requirement), so a host that
still has the previous image needs only those. The engine's classic loader (the overlay2
image store) looks each layer up by its chain id before reading its file from the archive,
so an archive without the layers the host has loads into the same image id. The
containerd image store resolves every layer from the archive itself, so hosts on it get
the whole archive.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from labfleet import progress
from labfleet.planning import current_run
from labfleet.settings import REPO_ROOT

CACHE_DIR = REPO_ROOT / "build" / "images"
# Room for the archive, the unpacked layers and some slack, relative to the image size.
DISK_FACTOR = 1.2
COMPRESSLEVEL = 1  # the copy, not the CPU, is what a delivery waits on; level 1 is most of gzip's gain

# Hosts are prepared concurrently, and a cache file is written by one of them (the process's
# own files; what one run has learned lives in ControllerImages).
_writing = threading.Lock()


@dataclass(frozen=True)
class Archive:
    """A compressed `docker save` of one image on the controller, and what it is made of."""

    ref: str
    image_id: str
    path: Path
    image_bytes: int
    diff_ids: tuple[str, ...]

    @property
    def needed_bytes(self) -> int:
        return int((self.image_bytes + self.path.stat().st_size) * DISK_FACTOR)


def archive_path(image_id: str, root: Path = REPO_ROOT) -> Path:
    """Where the checkout at root keeps the whole archive of image_id (partial ones sit beside it)."""
    return root / CACHE_DIR.relative_to(REPO_ROOT) / f"{image_id.removeprefix('sha256:')[:16]}.tar.gz"


class ControllerImages:
    """The controller engine's images as one run sees them: inspected and saved once each.

    Every host's planning asks about the same few images, and each docker CLI start costs
    the controller about 0.1 s, so an image found is inspected once per run (one not found
    is asked again: it may have been built since), and each is saved once.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.inspected: dict[str, dict] = {}
        self.archives: dict[str, Archive] = {}

    def inspect(self, ref: str) -> dict | None:
        """`docker image inspect` of ref on the controller, None where its engine lacks ref."""
        with self.lock:
            if ref not in self.inspected:
                argv = ["docker", "image", "inspect", ref]
                result = subprocess.run(argv, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    return None
                self.inspected[ref] = json.loads(result.stdout)[0]
            return self.inspected[ref]

    def has(self, ref: str) -> bool:
        return self.inspect(ref) is not None

    def image_id(self, ref: str) -> str:
        info = self.inspect(ref)
        if info is None:
            raise RuntimeError(f"image {ref} is not in the controller's engine")
        return info["Id"]

    def saved_archive(self, ref: str) -> Archive:
        """The compressed archive of ref on the controller, saved once per image id and kept."""
        with self.lock:
            if ref not in self.archives:
                self.archives[ref] = _save(ref, self.image_id(ref), self.inspect(ref) or {})
            return self.archives[ref]


def controller() -> ControllerImages:
    """This run's view of the controller's images."""
    return current_run().once("controller images", ControllerImages)


def _save(ref: str, image_id: str, info: dict) -> Archive:
    path = archive_path(image_id)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = _partial_beside(path)
        # The tar that `docker save` writes is about the image's size: the lines count against that.
        meter = progress.Meter(f"Save {ref}")
        total, saved = int(info.get("Size") or 0), 0
        with (
            subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE) as save,
            gzip.open(partial, "wb", compresslevel=COMPRESSLEVEL) as out,
        ):
            assert save.stdout is not None  # stdout=PIPE
            while chunk := save.stdout.read(1 << 20):
                out.write(chunk)
                saved += len(chunk)
                if meter.due():
                    progress.report(progress.controller_prefix(), meter.line(progress.Reading(saved, total)))
        if save.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"docker save {ref} failed with exit {save.returncode}")
        partial.replace(path)
    return Archive(ref, image_id, path, int(info["Size"]), tuple(info["RootFS"]["Layers"]))


def chain_ids(diff_ids: tuple[str, ...] | list[str]) -> list[str]:
    """The OCI chain id of every layer: a layer is reusable only on top of the same layers."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if chains:
            diff_id = "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
        chains.append(diff_id)
    return chains


def layers_present(archive: Archive, host_chains: set[str] | None) -> int:
    """How many of the image's bottom layers the host has already (0 when it cannot tell)."""
    if not host_chains:
        return 0
    present = 0
    for chain in chain_ids(archive.diff_ids):
        if chain not in host_chains:
            break
        present += 1
    return present


def for_host(archive: Archive, host_chains: set[str] | None) -> Path:
    """The archive to copy to a host whose engine has host_chains (None: send everything)."""
    skip = layers_present(archive, host_chains)
    if skip == 0:
        return archive.path
    with _writing:
        path = archive.path.with_name(archive.path.name.replace(".tar.gz", f"-above-{skip}.tar.gz"))
        if not path.exists():
            layers = _layer_files(archive)
            try:
                _write_without(archive.path, layers[:skip], layers[skip:], path)
            except _LinksIntoDropped:
                return archive.path
        return path


def _layer_files(archive: Archive) -> list[str]:
    """The archive's layer files in diff-id order (its manifest.json), read once and kept beside it."""
    index = archive.path.with_name(archive.path.name.replace(".tar.gz", ".layers.json"))
    if not index.exists():
        with gzip.open(archive.path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.name == "manifest.json":
                    manifest = tar.extractfile(member)
                    if manifest is None:
                        raise RuntimeError(f"{archive.path}: manifest.json is not a file")
                    (entry,) = json.load(manifest)
                    partial = _partial_beside(index)
                    partial.write_text(json.dumps(entry["Layers"]))
                    partial.replace(index)
                    break
            else:
                raise RuntimeError(f"{archive.path} has no manifest.json")
    return json.loads(index.read_text())


def _write_without(source: Path, dropped: list[str], kept: list[str], destination: Path) -> None:
    """Copy source to destination without the dropped layers' files.

    A file some kept layer also names (two layers with the same content) is kept, and so is
    anything a link points at, so the result always holds every file the kept layers need.
    """
    drop = {path for path in dropped if path not in kept}
    drop_dirs = {path.rsplit("/", 1)[0] for path in drop if path.endswith("/layer.tar")}
    partial = _partial_beside(destination)
    with (
        gzip.open(source) as raw,
        tarfile.open(fileobj=raw, mode="r|") as tar,
        gzip.open(partial, "wb", compresslevel=COMPRESSLEVEL) as out_raw,
        tarfile.open(fileobj=out_raw, mode="w|", format=tarfile.PAX_FORMAT) as out,
    ):
        for member in tar:
            if member.issym() or member.islnk():
                target = member.linkname if member.islnk() else _resolve(member.name, member.linkname)
                if target in drop or target.split("/", 1)[0] in drop_dirs:
                    partial.unlink()
                    raise _LinksIntoDropped(member.name)
            if member.name in drop or member.name.split("/", 1)[0] in drop_dirs:
                continue
            out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    partial.replace(destination)


def _partial_beside(path: Path) -> Path:
    """A file of this process's own next to path, renamed over it once complete: two deploys
    from one checkout may write the same cache entry at once, and neither sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    return Path(name)


class _LinksIntoDropped(Exception):
    """A kept file links into a dropped layer (two layers of the same content): send the whole archive."""


def _resolve(name: str, linkname: str) -> str:
    parts = name.split("/")[:-1]
    for part in linkname.split("/"):
        if part == "..":
            parts = parts[:-1]
        elif part not in ("", "."):
            parts.append(part)
    return "/".join(parts)
