"""Shipping an image the controller has to a host: only the layers the host lacks, checked by id.

Used by ``ship`` delivery, by ``build`` delivery for a base image only the controller has,
and by the registry host, which receives the image this way and then pushes to itself.
"""

from __future__ import annotations

import shlex
from typing import IO, cast

from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import files

from labfleet import archives, image, jupyter, planning, progress
from labfleet.facts.image import ImageId, LayerChains
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


@operation(is_idempotent=True)
def load_image(archive: str, ref: str, image_id: str):
    """Load a saved image on the host and check that ref now names image_id.

    + archive: the archive's path on the host, removed afterwards whatever happens
    + ref: the tag the archive carries
    + image_id: the id the tag must name afterwards
    """
    if host.get_fact(ImageId, ref=ref) == image_id:
        host.noop(f"{ref} is already {image_id[:19]}")
        return
    quoted = shlex.quote(archive)
    pid_file = shlex.quote(f"{archive}.pid")
    check = f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)}"
    # The loader reads the archive as its stdin, so its read offset is how far the load got.
    yield progress.WatchedCommand(
        f"sh -c 'echo $$ >\"$0\"; exec docker load' {pid_file} <{quoted} >/dev/null; loaded=$?; "
        f"rm -f {quoted} {pid_file}; "
        f'[ $loaded -eq 0 ] && [ "$({check})" = {shlex.quote(image_id)} ] || '
        f"{{ echo {shlex.quote(f'labfleet: loading {ref} did not give image {image_id}')} >&2; exit 1; }}",
        what=f"Load {ref}",
        unit="bytes",
        question=progress.read_offset_question(quoted, pid_file),
        answer=progress.read_offset_answer,
    )


@step("Ship an image")
def ship(settings: Settings, ref: str):
    archive = archives.controller().saved_archive(ref)
    if planned_image_id(settings, ref) == archive.image_id:
        host.noop(f"{ref} is already here as {archive.image_id[:19]}: nothing to copy")
        return
    free = host.get_fact(FreeBytes, path=DOCKER_ROOT)
    require(
        name=f"Check the free disk for {ref}",
        ok=free is not None and free >= archive.needed_bytes,
        problem=(
            f"host {settings.host}: {_gib(free)} free under {DOCKER_ROOT}, but {ref} needs about "
            f"{_gib(archive.needed_bytes)}; free some space (docker image prune) and run the deploy again"
        ),
    )
    # Read only when a copy is due: a host that has the image pays no round trip for it.
    source = archives.for_host(archive, host.get_fact(LayerChains))
    remote = f"{HOST_ARCHIVE_DIR}/labfleet-{source.name}"
    state = host.state
    copied = progress.ProgressReader(
        str(source), progress.Meter(f"Copy {ref}"), host.print_prefix, active=lambda: state.is_executing
    )
    # files.put takes any object that reads like a binary file. Without sudo, because with it
    # pyinfra uploads to /tmp (RAM on Debian 13) and then copies: the disk written twice, and
    # minutes without a progress line for a large image. /var/tmp lets the SSH user write, and
    # the root that loads the archive reads and removes it.
    files.put(name=f"Copy {ref}", src=cast(IO[bytes], copied), dest=remote, mode="600", _sudo=False)
    load_image(name=f"Load {ref}", archive=remote, ref=ref, image_id=archive.image_id)


def _gib(value: int | None) -> str:
    return "an unknown amount" if value is None else f"{value / 2**30:.1f} GiB"
