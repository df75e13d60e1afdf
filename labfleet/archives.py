"""`docker save` archives on the controller, whole or with only the layers a host lacks.

A new tag usually changes a few layers (a script, one requirement slice), and a host that
still has the previous image has every other layer already. Docker names a layer in its
engine by its chain id, which covers every layer below it, so after a change in slice k the
slices above it are new chains with old contents. Two ways keep their bytes off the wire:

- the bottom layers whose chain ids the host has are left out of the archive: the engine's
  classic loader (the overlay2 image store) looks a layer up by chain id before it reads the
  layer's file, so such an archive loads into the same image id;
- a layer above those whose diff id the host holds in any image is left out too, and the host
  copies its file from its own engine before loading (labfleet.shipping): `docker save`
  rebuilds a layer's tar byte for byte (from its tar-split), and Docker 25 and later write it
  as blobs/sha256/<diff id>, so the host finds it by the name the controller gives.

The containerd image store resolves every layer from the archive itself, so hosts on it get
the whole archive.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from labfleet import archive_cache, progress
from labfleet.facts.image import EngineLayers
from labfleet.planning import current_run
from labfleet.settings import REPO_ROOT

CACHE_DIR = REPO_ROOT / "build" / "images"
# Slack on the disk a load needs: `docker load` unpacks the whole archive (the image's size)
# before it registers the layers (the image's size again).
DISK_FACTOR = 1.2
COMPRESSLEVEL = 1  # the copy, not the CPU, is what a delivery waits on; level 1 is most of gzip's gain
# Docker 25 saves an image as an OCI layout, each layer under blobs/sha256/<diff id>.
FILL_MIN_ENGINE = 25
# A host copies layers out of `docker save` of a whole image, read from its own disk: worth it
# for layers of at least this part of that image (170 MB of the 8.4 GB pytorch image, seconds
# on a LAN); smaller ones travel. Keeps a bump of any slice above torch's under 5% of the image.
FILL_WORTH = 0.02


@dataclass(frozen=True)
class Codec:
    """How archives are compressed on the controller and read on a host.

    + name: as LABFLEET_SHIP_CODEC names it
    + suffix: the archive's file name ending
    + compress: the controller's filter (stdin to stdout); empty: Python's gzip at COMPRESSLEVEL
    + decompress: the controller's filter back (empty: Python's gzip)
    + host_decompress: the host's filter, in order of preference (a missing program is skipped;
      none: `docker load` reads the archive itself)
    + host_package: the distribution's package that the ship step installs on a host for it
    """

    name: str
    suffix: str
    compress: tuple[str, ...] = ()
    decompress: tuple[str, ...] = ()
    host_decompress: tuple[str, ...] = ()
    host_package: str | None = None


CODECS = {
    codec.name: codec
    for codec in (
        Codec("gzip", ".tar.gz"),
        Codec("pigz", ".tar.gz", ("pigz", "-1"), ("pigz", "-dc"), ("pigz -dc",), "pigz"),
        Codec("zstd", ".tar.zst", ("zstd", "-3", "-T0", "-q"), ("zstd", "-dc", "-q"), ("zstd -dcq",), "zstd"),
    )
}
CODEC_ENV = "LABFLEET_SHIP_CODEC"  # an internal knob for the delivery bench, not a setting
# zstd: the pytorch image end to end (save, copy, decompression) in 0.28x the time of gzip -1,
# 0.46x its size against 0.57x (bench/DELIVERY.md); it decompresses at 16 times gzip's rate.
DEFAULT_CODEC = "zstd"


def codec() -> Codec:
    """The codec of this run's archives (LABFLEET_SHIP_CODEC, else DEFAULT_CODEC); gzip, which
    Python writes itself, where the controller lacks the chosen one's program."""
    chosen = CODECS.get(os.environ.get(CODEC_ENV, ""), CODECS[DEFAULT_CODEC])
    if chosen.compress and shutil.which(chosen.compress[0]) is None:
        return CODECS["gzip"]
    return chosen


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
        """Disk a host needs to load the whole archive: the copy, then the engine's unpacked copy
        and the layers (the archive is removed once the loader has it open)."""
        return int(max(self.path.stat().st_size, 2 * self.image_bytes) * DISK_FACTOR)


def archive_path(image_id: str, root: Path = REPO_ROOT, compressed: Codec | None = None) -> Path:
    """Where the checkout at root keeps the whole archive of image_id (partial ones sit beside it)."""
    chosen = compressed or codec()
    name = image_id.removeprefix("sha256:")[:16] + ("" if chosen.name == DEFAULT_CODEC else f"-{chosen.name}")
    return root / CACHE_DIR.relative_to(REPO_ROOT) / f"{name}{chosen.suffix}"


def archive_codec(path: Path) -> Codec:
    """The codec an archive was written with, from its name (see archive_path and for_host)."""
    parts = path.name.split(".", 1)[0].split("-")
    if len(parts) > 1 and parts[1] in CODECS:
        return CODECS[parts[1]]
    return CODECS["zstd"] if path.name.endswith(".tar.zst") else CODECS["gzip"]


@contextlib.contextmanager
def open_compressed(path: Path, mode: str = "rb", compressed: Codec | None = None) -> Iterator[IO[bytes]]:
    """The archive at path as a plain binary stream, read ("rb") or written ("wb") through its codec."""
    chosen = compressed or archive_codec(path)
    reading = mode == "rb"
    argv = chosen.decompress if reading else chosen.compress
    if not argv:
        with gzip.open(path, mode, compresslevel=COMPRESSLEVEL) as plain:
            yield plain  # type: ignore[misc]  # a GzipFile reads and writes bytes
        return
    with open(path, mode) as file:
        if reading:
            process = subprocess.Popen(argv, stdin=file, stdout=subprocess.PIPE)
            stream = process.stdout
        else:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=file)
            stream = process.stdin
        assert stream is not None  # a PIPE
        try:
            yield stream
        finally:
            if reading and process.poll() is None:
                process.kill()  # a reader may stop before the end (the manifest found)
            stream.close()
            returncode = process.wait()
        if returncode != 0 and not reading:
            raise RuntimeError(f"{' '.join(argv)} failed with exit {returncode} writing {path}")


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
        total = int(info.get("Size") or 0)
        try:
            unreadable: Exception | None = None
            with (
                subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE) as save,
                open_compressed(partial, "wb", archive_codec(path)) as out,
            ):
                assert save.stdout is not None  # stdout=PIPE
                passing = _Tee(save.stdout, out, meter, total)
                try:
                    # The tar is read as it passes, so the index costs no second read of the archive.
                    index = _read_index(cast(IO[bytes], passing))
                    while passing.read(1 << 20):
                        pass
                except (tarfile.TarError, RuntimeError) as error:
                    unreadable = error  # a failed save ends its tar early: say that, not the tar's error
            if save.returncode != 0:
                raise RuntimeError(f"docker save {ref} failed with exit {save.returncode}") from unreadable
            if unreadable is not None:
                raise unreadable
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        _write_index(path, index)
        partial.replace(path)
        try:
            removed = archive_cache.prune(path.parent, archive_cache.engine_image_ids(), keep=path)
        except OSError as error:  # a file of another user, say: the deploy has what it needs
            progress.report(progress.controller_prefix(), f"could not remove older image archives: {error}")
            removed = []
        if removed:
            progress.report(
                progress.controller_prefix(),
                f"removed {len(removed)} file(s) of older image archives from build/images/ (kept: the "
                f"{archive_cache.KEEP_ARCHIVES} most recently used images', and anything used in the last "
                f"{archive_cache.PRUNE_GRACE // 3600} hours)",
            )
    else:
        with contextlib.suppress(OSError):
            os.utime(path)  # used: the most recently used archives are the ones kept
    return Archive(ref, image_id, path, int(info["Size"]), tuple(info["RootFS"]["Layers"]))


class _Tee:
    """A stream that writes what is read from it to out, printing the save's progress lines."""

    def __init__(self, source: IO[bytes], out: IO[bytes], meter: progress.Meter, total: int) -> None:
        self.source, self.out, self.meter, self.total = source, out, meter, total
        self.done = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.out.write(data)
        self.done += len(data)
        if data and self.meter.due():
            progress.report(progress.controller_prefix(), self.meter.line(progress.Reading(self.done, self.total)))
        return data


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
    return layers_present_in(archive.diff_ids, host_chains)


def host_chains(engine: EngineLayers | None) -> set[str] | None:
    """Every chain id in the host's engine; None where it loads whole archives only."""
    if engine is None or engine["store"] != "classic":
        return None
    return {chain for image in engine["images"] for chain in chain_ids(image["layers"])}


def fills(engine: EngineLayers) -> bool:
    """Whether the host can copy layers from its own images into an archive before loading it."""
    major = engine["version"].split(".", 1)[0]
    return (
        engine["store"] == "classic" and major.isdigit() and int(major) >= FILL_MIN_ENGINE and not engine["fill_failed"]
    )


@dataclass(frozen=True)
class Fill:
    """Layers the host copies from one of its own images: `docker save` of image, these diff ids."""

    image: str
    diff_ids: tuple[str, ...]


@dataclass(frozen=True)
class LayerPlan:
    """Which of an image's layers reach a host, and how (indexes into its diff ids, bottom first).

    + skip: the bottom layers whose chain ids the host has: not in the archive, the loader finds them
    + send: the layers whose files travel in the archive
    + fills: the layers the host copies from its own images, image by image
    """

    skip: int
    send: tuple[int, ...]
    fills: tuple[Fill, ...] = field(default=())

    @property
    def whole(self) -> bool:
        return self.skip == 0 and not self.fills


def plan_layers(
    diff_ids: tuple[str, ...], engine: EngineLayers | None, layer_bytes: tuple[int, ...] | None = None
) -> LayerPlan:
    """What to send to a host whose engine holds engine (None: it could not tell; send everything).

    Above the layers it has by chain, a layer whose diff id any of the host's images holds is
    copied there, from as few images as cover them all (the most layers first, then the smaller
    image), where they come to FILL_WORTH of the image saved (layer_bytes: each layer's size;
    None: always).
    """
    skip = layers_present_in(diff_ids, host_chains(engine))
    above = range(skip, len(diff_ids))
    if engine is None or not fills(engine):
        return LayerPlan(skip, tuple(above))
    sizes = dict(zip(diff_ids, layer_bytes, strict=True)) if layer_bytes is not None else None
    wanted = {diff_ids[i] for i in above}
    chosen: list[Fill] = []
    images = sorted(engine["images"], key=lambda image: (image["size"], image["id"]))
    while images:
        best = max(images, key=lambda image: len(wanted.intersection(image["layers"])))
        covered = wanted.intersection(best["layers"])
        if not covered:
            break
        images.remove(best)
        if sizes is None or sum(sizes[diff_id] for diff_id in covered) >= FILL_WORTH * best["size"]:
            chosen.append(Fill(best["id"], tuple(sorted(covered))))
            wanted -= covered
    return LayerPlan(skip, tuple(i for i in above if diff_ids[i] in wanted), tuple(chosen))


def layers_present_in(diff_ids: tuple[str, ...], chains: set[str] | None) -> int:
    """How many of diff_ids' bottom layers chains holds, as chains (0 when it cannot tell)."""
    if not chains:
        return 0
    present = 0
    for chain in chain_ids(diff_ids):
        if chain not in chains:
            break
        present += 1
    return present


@dataclass(frozen=True)
class Shipment:
    """What travels to one host: the archive to copy, and the layers the host fills in itself.

    + path: the archive on the controller
    + plan: the layers' plan it was written for (plan.whole: the whole archive)
    + layer_files: each layer's file in the archive, in diff-id order (manifest.json)
    + unpacked_bytes: the size of the layer files the host unpacks and fills in before loading
    """

    path: Path
    plan: LayerPlan
    layer_files: tuple[str, ...]
    unpacked_bytes: int

    def needed_bytes(self, archive: Archive) -> int:
        """Disk the host needs for what it loads, not for the whole image: a 30 MB bump of an 8 GB
        image must not ask for 20 GB free. A plain load: the copy, or the engine's unpacked copy of
        the layers sent and the layers loaded (the copy is removed once the loader has it open).
        A filled load: the archive, the unpacked layers, the engine's copy of them and the layers."""
        if self.plan.whole:
            return archive.needed_bytes
        if not self.plan.fills:
            return int(max(self.path.stat().st_size, 2 * self.unpacked_bytes) * DISK_FACTOR)
        return int((self.path.stat().st_size + 3 * self.unpacked_bytes) * DISK_FACTOR)

    def fill_files(self, diff_ids: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
        """Each filled diff id and the archive paths its file goes to (two layers may share one)."""
        filled = {diff_id for fill in self.plan.fills for diff_id in fill.diff_ids}
        paths: dict[str, list[str]] = {}
        for index in range(self.plan.skip, len(diff_ids)):
            if diff_ids[index] in filled and self.layer_files[index] not in paths.get(diff_ids[index], []):
                paths.setdefault(diff_ids[index], []).append(self.layer_files[index])
        return {diff_id: tuple(found) for diff_id, found in paths.items()}


def for_host(archive: Archive, engine: EngineLayers | None) -> Shipment:
    """The archive to copy to a host whose engine holds engine (None: send everything)."""
    if plan_layers(archive.diff_ids, engine).whole:
        return Shipment(archive.path, LayerPlan(0, tuple(range(len(archive.diff_ids)))), (), 0)
    index = _index(archive)
    files: list[str] = index["layers"]
    sizes: dict[str, int] = index["sizes"]
    plan = plan_layers(archive.diff_ids, engine, tuple(sizes[path] for path in files))
    kept = [files[i] for i in plan.send]
    dropped = [files[i] for i in range(len(files)) if i not in plan.send]
    unpacked = sum(sizes[path] for path in set(files[plan.skip :]))
    if not plan.fills:
        name = f"-above-{plan.skip}"
    else:
        name = "-layers-" + hashlib.sha256(" ".join(map(str, plan.send)).encode()).hexdigest()[:12]
    suffix = archive_codec(archive.path).suffix
    path = archive.path.with_name(archive.path.name.removesuffix(suffix) + name + suffix)
    with _writing:
        if not path.exists():
            try:
                _write_without(archive.path, dropped, kept, path)
            except _LinksIntoDropped:
                return Shipment(archive.path, LayerPlan(0, tuple(range(len(files)))), (), 0)
        else:
            with contextlib.suppress(OSError):
                os.utime(path)  # used: another deploy's prune leaves it until this one has copied it
    return Shipment(path, plan, tuple(files), unpacked)


def _index_path(archive: Path) -> Path:
    return archive.with_name(archive.name.split(".", 1)[0] + ".index.json")


def _index(archive: Archive) -> dict:
    """The archive's layer files in diff-id order (its manifest.json) and their sizes: written
    by the save, or read from an archive saved without it."""
    index = _index_path(archive.path)
    if not index.exists():
        with open_compressed(archive.path) as raw:
            _write_index(archive.path, _read_index(raw))
    return json.loads(index.read_text())


def _read_index(stream: IO[bytes]) -> dict:
    """Layer files and sizes from a `docker save` tar, read to its end-of-archive."""
    sizes: dict[str, int] = {}
    links: dict[str, str] = {}
    layers = None
    with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tar:
        for member in tar:
            sizes[member.name] = member.size
            if member.issym():
                links[member.name] = _resolve(member.name, member.linkname)
            elif member.name == "manifest.json":
                manifest = tar.extractfile(member)
                if manifest is None:
                    raise RuntimeError("manifest.json is not a file")
                (entry,) = json.load(manifest)
                layers = entry["Layers"]
    if layers is None:
        raise RuntimeError("the archive has no manifest.json")
    # A layer saved as a link to another's file (Docker 20.10) has that file's size.
    sizes.update({path: sizes.get(target, 0) for path, target in links.items()})
    return {"layers": layers, "sizes": {path: sizes.get(path, 0) for path in layers}}


def _write_index(archive: Path, index: dict) -> None:
    partial = _partial_beside(_index_path(archive))
    partial.write_text(json.dumps(index))
    partial.replace(_index_path(archive))


def _write_without(source: Path, dropped: list[str], kept: list[str], destination: Path) -> None:
    """Copy source to destination without the dropped layers' files.

    A file some kept layer also names (two layers with the same content) is kept; a kept link
    into a dropped file (Docker 20.10 saves a second layer of the same content so) means the
    whole archive instead, so the result always holds every file the kept layers need.
    """
    drop = {path for path in dropped if path not in kept}
    drop_dirs = {path.rsplit("/", 1)[0] for path in drop if path.endswith("/layer.tar")}
    partial = _partial_beside(destination)
    try:
        with (
            open_compressed(source) as raw,
            tarfile.open(fileobj=raw, mode="r|") as tar,
            open_compressed(partial, "wb", archive_codec(destination)) as out_raw,
            tarfile.open(fileobj=out_raw, mode="w|", format=tarfile.PAX_FORMAT) as out,
        ):
            for member in tar:
                if member.name in drop or member.name.split("/", 1)[0] in drop_dirs:
                    continue
                if member.issym() or member.islnk():
                    target = member.linkname if member.islnk() else _resolve(member.name, member.linkname)
                    if target in drop or target.split("/", 1)[0] in drop_dirs:
                        raise _LinksIntoDropped(member.name)
                out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
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
