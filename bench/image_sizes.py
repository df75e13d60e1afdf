"""Where an image's bytes are: per package, per layer, and against the wheels-plus-base floor.

The image bench (bench/image.py) runs SURVEY inside a built image and `docker history` on it;
the functions here turn those answers into the tables of bench/IMAGE.md. They are pure, so the
aggregation is unit-tested without an engine.

The floor of issue 16 is the installed size of the profile's wheels (every file each
distribution's RECORD lists, as installed) plus the base image: what no layering can avoid.
Bytecode is not in a RECORD (install-layer.sh compiles it after pip), so it is reported on its
own, as is everything else the image adds (the apt layer: git, tini, the venv itself).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypedDict

# Runs in the image as `python -c SURVEY`: one JSON object on stdout. Stdlib only; the venv's
# python, so importlib.metadata sees the venv's distributions.
SURVEY = r"""
import json, os, stat, sys, sysconfig
from importlib import metadata

site = sysconfig.get_paths()["purelib"]
venv = sys.prefix
seen = set()
owner = {}
packages = []
for dist in metadata.distributions(path=[site]):
    name = dist.metadata["Name"]
    size = files = 0
    for entry in dist.files or []:
        path = os.path.normpath(str(dist.locate_file(entry)))
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if path in owner:
            continue
        owner[path] = name
        key = (info.st_dev, info.st_ino)
        if key in seen:
            continue
        seen.add(key)
        size += info.st_size
        files += 1
    packages.append({"name": name, "version": dist.version, "bytes": size, "files": files, "bytecode": 0})
by_name = {p["name"]: p for p in packages}
venv_other = 0
for directory, dirs, names in os.walk(venv):
    for name in names:
        path = os.path.join(directory, name)
        if path in owner:
            continue
        info = os.lstat(path)
        key = (info.st_dev, info.st_ino)
        if key in seen:
            continue
        seen.add(key)
        source = None
        if os.path.basename(directory) == "__pycache__" and name.endswith(".pyc"):
            source = os.path.join(os.path.dirname(directory), name.split(".")[0] + ".py")
        if source in owner:
            by_name[owner[source]]["bytecode"] += info.st_size
        else:
            venv_other += info.st_size
rootfs = 0
skip = {"/proc", "/sys", "/dev", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}
inodes = set()
for directory, dirs, names in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(directory, d) not in skip]
    for name in names:
        path = os.path.join(directory, name)
        if path in skip:
            continue
        info = os.lstat(path)
        if stat.S_ISDIR(info.st_mode):
            continue
        key = (info.st_dev, info.st_ino)
        if key in inodes:
            continue
        inodes.add(key)
        rootfs += info.st_size
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "packages": packages, "venv_other": venv_other,
                  "rootfs": rootfs}))
"""


class Package(TypedDict):
    name: str
    version: str
    bytes: int  # the files its RECORD lists, as installed
    files: int
    bytecode: int  # __pycache__/*.pyc of its modules, compiled by install-layer.sh


class Survey(TypedDict):
    python: str
    packages: list[Package]
    venv_other: int  # /opt/venv files no distribution owns (the venv's python links, pyvenv.cfg, kernel specs)
    rootfs: int  # every file of the image as a container sees it (hard links once)


@dataclass(frozen=True)
class Layer:
    """One entry of RootFS.Layers, with the build step that wrote it."""

    index: int  # 1-based, bottom first
    digest: str
    size: int  # as `docker history` gives it: the layer's uncompressed bytes
    step: str  # a short form of the instruction
    slot: int | None = None  # the lock slice (1..20) it installs or copies, if any


@dataclass(frozen=True)
class Floor:
    """An image's size against the installed wheels plus the base."""

    image: int
    base: int
    wheels: int  # sum of Package.bytes
    bytecode: int
    venv_other: int
    rootfs: int
    shadowed: int = field(default=0)  # image - rootfs: bytes in a lower layer that a higher layer replaced

    @property
    def floor(self) -> int:
        return self.base + self.wheels

    @property
    def ratio(self) -> float:
        return self.image / self.floor if self.floor else float("nan")

    @property
    def rest(self) -> int:
        """What the image holds beyond the floor, bytecode and the venv's own files."""
        return self.image - self.floor - self.bytecode - self.venv_other


def parse_survey(text: str) -> Survey:
    """The JSON SURVEY printed (the last line that parses: pip or python may warn before it)."""
    for line in reversed(text.strip().splitlines()):
        try:
            survey = json.loads(line)
        except ValueError:
            continue
        if isinstance(survey, dict) and "packages" in survey:
            return survey  # type: ignore[return-value]
    raise ValueError(f"no survey in the image's answer: {text[-300:]!r}")


def floor(survey: Survey, image_size: int, base_size: int) -> Floor:
    packages = survey["packages"]
    return Floor(
        image=image_size,
        base=base_size,
        wheels=sum(p["bytes"] for p in packages),
        bytecode=sum(p["bytecode"] for p in packages),
        venv_other=survey["venv_other"],
        rootfs=survey["rootfs"],
        shadowed=image_size - survey["rootfs"],
    )


def _is_layer(created_by: str) -> bool:
    """Whether a `docker history` entry wrote a layer: metadata steps are `#(nop)` but COPY/ADD are not."""
    if "#(nop)" not in created_by:
        return True
    return any(f"#(nop) {word} " in created_by for word in ("COPY", "ADD"))


def _step(created_by: str) -> str:
    text = " ".join(created_by.split())
    if "#(nop) COPY" in text or "#(nop) ADD" in text:
        return "COPY " + text.rsplit(" in ", 1)[-1]
    if "install-layer.sh /labfleet-lock-" in text:
        return "RUN install-layer.sh " + text.split("/labfleet-lock-", 1)[1].split()[0]
    if not text:
        return "base image"
    return "RUN " + text.split("/bin/sh -c ", 1)[-1][:60]


def _slot(created_by: str) -> int | None:
    marker = "labfleet-lock-"
    if marker not in created_by:
        return None
    digits = created_by.split(marker, 1)[1][:2]
    return int(digits) if digits.isdigit() else None


def layers(history: str, rootfs_layers: list[str]) -> list[Layer]:
    """RootFS.Layers with their steps and sizes, from `docker history --no-trunc --human=false
    --format '{{.Size}}\\t{{.CreatedBy}}'` (newest first). Raises ValueError when the two disagree."""
    entries = []
    for line in history.splitlines():
        if not line.strip():
            continue
        size, _, created_by = line.partition("\t")
        if _is_layer(created_by):
            entries.append((int(size), created_by))
    entries.reverse()
    if len(entries) > len(rootfs_layers):
        # A RUN that changed nothing (an empty slice) writes no layer, and `docker history` does
        # not say which entries are empty; a RUN of 0 bytes is, when that accounts for all.
        entries = [(size, created_by) for size, created_by in entries if size or "#(nop)" in created_by]
    if len(entries) != len(rootfs_layers):
        raise ValueError(f"docker history names {len(entries)} layers, RootFS has {len(rootfs_layers)}")
    return [
        Layer(index=number, digest=digest, size=size, step=_step(created_by), slot=_slot(created_by))
        for number, (digest, (size, created_by)) in enumerate(zip(rootfs_layers, entries, strict=True), start=1)
    ]


@dataclass(frozen=True)
class Difference:
    """Two builds of the same Dockerfile compared layer by layer."""

    changed: list[Layer]  # the new image's layers whose digest differs at the same position
    total: int  # the new image's layer count
    changed_bytes: int
    image_bytes: int

    @property
    def share(self) -> float:
        return self.changed_bytes / self.image_bytes if self.image_bytes else float("nan")


def compare(old: list[Layer], new: list[Layer]) -> Difference:
    """Which layers of new a host holding old must receive (a layer is reused by digest)."""
    held = {layer.digest for layer in old}
    changed = [layer for layer in new if layer.digest not in held]
    return Difference(
        changed=changed,
        total=len(new),
        changed_bytes=sum(layer.size for layer in changed),
        image_bytes=sum(layer.size for layer in new),
    )


def slices_by_package(packages: Iterable[Package], slot: Callable[[str], int]) -> dict[int, list[Package]]:
    """The packages of each lock slice (layer_locks.slot), largest first."""
    grouped: dict[int, list[Package]] = {}
    for package in packages:
        grouped.setdefault(slot(package["name"]), []).append(package)
    return {number: sorted(items, key=lambda p: -p["bytes"]) for number, items in sorted(grouped.items())}
