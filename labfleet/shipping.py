"""Shipping an image the controller has to a host: only the layers the host lacks, checked by id.

The archive holds the layers whose diff ids no image of the host holds (labfleet.archives). The
host fills in the others from its own engine before it loads: `docker save` of an image that has
them, through a tar that keeps only those files, into the unpacked archive. The engine checks
every layer it reads against the image's diff ids, so a filled layer that differs fails the load,
and a load that fails never moves the tag. Should filling fail on a host, it is marked there
(FILL_FAILED_MARKER) and later deploys send it every layer it lacks by chain, as before.

Used by ``ship`` delivery, by ``build`` delivery for a base image only the controller has,
and by the registry host, which receives the image this way and then pushes to itself.
"""

from __future__ import annotations

import shlex
from typing import IO, cast

from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import files

from labfleet import apt, archives, image, jupyter, planning, progress
from labfleet.facts.image import FILL_FAILED_MARKER, HostEngineLayers, ImageId
from labfleet.facts.system import FreeBytes
from labfleet.planning import Read, step
from labfleet.preflight import require
from labfleet.settings import Settings

HOST_ARCHIVE_DIR = "/var/tmp"
DOCKER_ROOT = "/var/lib/docker"


def planned_image_id(settings: Settings, ref: str) -> str | None:
    """The id ref names on the host, as planning read it (the lab image's tag, or the base image)."""
    if ref == image.image_tag(settings) and settings.jupyter_users:
        return jupyter.host_state(settings).image_id
    return planning.read({"image": Read(ImageId, {"ref": ref})})["image"]


def decompress_filter(codec: archives.Codec) -> str:
    """Shell that sets $unpack to the first of the codec's host filters the host has ('' for none)."""
    choices = " ".join(shlex.quote(command) for command in codec.host_decompress)
    return (
        f"unpack=; for c in {choices}; do command -v ${{c%% *}} >/dev/null && {{ unpack=$c; break; }}; done; "
        if choices
        else "unpack=; "
    )


def load_command(archive: str, ref: str, image_id: str, codec: str) -> str:
    """The host's shell for load_image: load the archive (removed once open), check the id."""
    quoted = shlex.quote(archive)
    pid_file = shlex.quote(f"{archive}.pid")
    check = f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)}"
    # The reader removes the archive once it has it open (the shell's redirection is the
    # reader's own): the engine unpacks all of it before it registers the layers, so the host
    # never holds the archive, the unpacked copy and the layers at once. The reader's offset
    # is how far the load got; the engine reads gzip itself.
    return (
        decompress_filter(archives.CODECS[codec])
        + f'if [ -n "$unpack" ]; then sh -c \'echo $$ >"$0"; rm -f "$2"; exec $1\' {pid_file} "$unpack" {quoted} '
        f"<{quoted} | docker load >/dev/null; "
        f'else sh -c \'echo $$ >"$0"; rm -f "$1"; exec docker load\' {pid_file} {quoted} <{quoted} >/dev/null; fi; '
        f"loaded=$?; rm -f {quoted} {pid_file}; "
        f'[ $loaded -eq 0 ] && [ "$({check})" = {shlex.quote(image_id)} ] || '
        f"{{ echo {shlex.quote(f'labfleet: loading {ref} did not give image {image_id}')} >&2; exit 1; }}"
    )


@operation(is_idempotent=True)
def load_image(archive: str, ref: str, image_id: str, codec: str = archives.DEFAULT_CODEC, archive_bytes: int = 0):
    """Load a saved image on the host and check that ref now names image_id.

    + archive: the archive's path on the host, removed afterwards whatever happens
    + ref: the tag the archive carries
    + image_id: the id the tag must name afterwards
    + codec: the archive's compression (labfleet.archives.CODECS)
    + archive_bytes: the archive's size, for the progress lines
    """
    if host.get_fact(ImageId, ref=ref) == image_id:
        host.noop(f"{ref} is already {image_id[:19]}")
        return
    yield progress.WatchedCommand(
        load_command(archive, ref, image_id, codec),
        what=f"Load {ref}",
        unit="bytes",
        question=progress.read_offset_question(
            shlex.quote(archive), shlex.quote(f"{archive}.pid"), size=archive_bytes or None
        ),
        answer=progress.read_offset_answer,
    )


def fill_and_load_script(
    archive: str,
    ref: str,
    image_id: str,
    fills: list[tuple[str, dict[str, tuple[str, ...]]]],
    codec: str,
    marker: str = FILL_FAILED_MARKER,
) -> str:
    """The host's shell: unpack the archive, fill in layers from the host's images, load, check.

    + fills: (image id, {diff id: the archive paths its file goes to}) per image to save
    + marker: the file that tells later deploys that filling failed here
    """
    quoted = shlex.quote(archive)
    work, phase = shlex.quote(f"{archive}.d"), shlex.quote(f"{archive}.phase")
    lines = [
        decompress_filter(archives.CODECS[codec]) + ('[ -n "$unpack" ] || unpack="gzip -dc"; ok=0; '),
        f"rm -rf {work} && mkdir -m 700 {work} {work}/.fill || exit 1; echo unpack >{phase}; ",
        f"$unpack <{quoted} | tar -x -C {work} || ok=1; rm -f {quoted}; ",
        f"[ $ok -eq 0 ] && echo fill >{phase}; ",
    ]
    for image_ref, layer_paths in fills:
        blobs = " ".join(
            shlex.quote(f"blobs/sha256/{diff_id.removeprefix('sha256:')}") for diff_id in sorted(layer_paths)
        )
        lines.append(
            f"[ $ok -eq 0 ] && {{ docker save {shlex.quote(image_ref)} "
            f"| tar -x -C {work}/.fill --occurrence=1 {blobs} || ok=2; }}; "
        )
        for diff_id, paths in sorted(layer_paths.items()):
            blob = shlex.quote(f"{archive}.d/.fill/{_blob(diff_id)}")
            first, *others = (shlex.quote(f"{archive}.d/{path}") for path in paths)
            moves = [f'mkdir -p "$(dirname {first})"', f"rm -f {first}", f"mv {blob} {first}"]
            moves += [f'mkdir -p "$(dirname {other})" && rm -f {other} && ln {first} {other}' for other in others]
            lines.append(f"[ $ok -eq 0 ] && {{ {' && '.join(moves)} || ok=2; }}; ")
    check = f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)}"
    failed_fill = shlex.quote(
        f"labfleet: the layers of {ref} this host has could not be copied from its own images; "
        "the next deploy sends them with the archive"
    )
    lines += [
        f"[ $ok -eq 0 ] && {{ rm -rf {work}/.fill; echo load >{phase}; "
        f"tar -C {work} -cf - . | docker load >/dev/null || ok=3; }}; ",
        f"rm -rf {work} {phase}; ",
        f'if [ $ok -eq 2 ]; then mkdir -p "$(dirname {shlex.quote(marker)})" && touch {shlex.quote(marker)}; '
        f"echo {failed_fill} >&2; exit 1; fi; ",
        f'[ $ok -eq 0 ] && [ "$({check})" = {shlex.quote(image_id)} ] || '
        f"{{ echo {shlex.quote(f'labfleet: loading {ref} did not give image {image_id}')} >&2; exit 1; }}",
    ]
    return "".join(lines)


def _blob(diff_id: str) -> str:
    """Where Docker 25 and later put a layer in `docker save`: under its diff id (archives.FILL_MIN_ENGINE)."""
    return f"blobs/sha256/{diff_id.removeprefix('sha256:')}"


FILL_PHASES = {
    "unpack": "unpacking the archive",
    "fill": "copying the layers this host has from its own images",
    "load": progress.LOADING,
}


def fill_question(archive: str) -> str:
    work, phase = shlex.quote(f"{archive}.d"), shlex.quote(f"{archive}.phase")
    return f"cat {phase} 2>/dev/null; du -sb {work} 2>/dev/null | cut -f1; true"


def fill_answer(total: int):
    def answer(text: str) -> progress.Reading:
        words = text.split()
        if len(words) == 2 and words[0] in FILL_PHASES and words[1].isdigit():
            return progress.Reading(min(int(words[1]), total), total, FILL_PHASES[words[0]])
        return progress.Reading(None)

    return answer


@operation(is_idempotent=True)
def fill_and_load_image(
    archive: str,
    ref: str,
    image_id: str,
    fills: list[tuple[str, dict[str, tuple[str, ...]]]],
    unpacked_bytes: int,
    codec: str = archives.DEFAULT_CODEC,
):
    """Load an archive that lacks layers the host has: fill them in from its own images first.

    + archive: the archive's path on the host, removed afterwards whatever happens
    + ref: the tag the archive carries
    + image_id: the id the tag must name afterwards
    + fills: (image id, {diff id: archive paths}) per host image to copy layers from
    + unpacked_bytes: the size of the layer files unpacked and filled in (for the progress lines)
    + codec: the archive's compression (labfleet.archives.CODECS)
    """
    if host.get_fact(ImageId, ref=ref) == image_id:
        host.noop(f"{ref} is already {image_id[:19]}")
        return
    yield progress.WatchedCommand(
        fill_and_load_script(archive, ref, image_id, fills, codec),
        what=f"Load {ref}",
        unit="bytes",
        question=fill_question(archive),
        answer=fill_answer(unpacked_bytes),
    )


@step("Ship an image")
def ship(settings: Settings, ref: str):
    archive = archives.controller().saved_archive(ref)
    if planned_image_id(settings, ref) == archive.image_id:
        host.noop(f"{ref} is already here as {archive.image_id[:19]}: nothing to copy")
        return
    # Read only when a copy is due: a host that has the image pays no round trip for it.
    shipment = archives.for_host(archive, host.get_fact(HostEngineLayers))
    free = host.get_fact(FreeBytes, path=DOCKER_ROOT)
    needed = shipment.needed_bytes(archive)
    require(
        name=f"Check the free disk for {ref}",
        ok=free is not None and free >= needed,
        problem=(
            f"host {settings.host}: {_gib(free)} free under {DOCKER_ROOT}, but {ref} needs about "
            f"{_gib(needed)}; free some space (docker image prune) and run the deploy again"
        ),
    )
    source = shipment.path
    remote = f"{HOST_ARCHIVE_DIR}/labfleet-{source.name}"
    state = host.state
    copied = progress.ProgressReader(
        str(source), progress.Meter(f"Copy {ref}"), host.print_prefix, active=lambda: state.is_executing
    )
    # files.put takes any object that reads like a binary file. Without sudo, because with it
    # pyinfra uploads to /tmp (RAM on Debian 13) and then copies: the disk written twice, and
    # minutes without a progress line for a large image. /var/tmp lets the SSH user write, and
    # the root that loads the archive reads and removes it.
    codec = archives.archive_codec(source)
    if codec.host_package:
        apt.ensure_packages(name=f"Install {codec.host_package} to unpack {ref}", packages=[codec.host_package])
    files.put(name=f"Copy {ref}", src=cast(IO[bytes], copied), dest=remote, mode="600", _sudo=False)
    if shipment.plan.fills:
        fills = shipment.fill_files(archive.diff_ids)
        fill_and_load_image(
            name=f"Load {ref}",
            archive=remote,
            ref=ref,
            image_id=archive.image_id,
            fills=[(fill.image, {d: fills[d] for d in fill.diff_ids}) for fill in shipment.plan.fills],
            unpacked_bytes=shipment.unpacked_bytes,
            codec=codec.name,
        )
    else:
        load_image(
            name=f"Load {ref}",
            archive=remote,
            ref=ref,
            image_id=archive.image_id,
            codec=codec.name,
            archive_bytes=source.stat().st_size,
        )


def _gib(value: int | None) -> str:
    return "an unknown amount" if value is None else f"{value / 2**30:.1f} GiB"
