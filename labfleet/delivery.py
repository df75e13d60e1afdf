"""Image delivery: the lab image on every host, under its tag, moving bytes only where needed.

- build: the build context is synced to /opt/labfleet/image (changed files only) and the
  host builds it, unless it already has the tag. A base image that only the controller
  has (offline labs, the tests) is shipped first.
- ship: the controller builds once and saves once (gzip); only hosts whose engine lacks
  that image id get the archive, less the layers they already have (labfleet/archives.py),
  `docker load` it, and have the id verified. A failed or interrupted load never moves the
  tag, so the running container keeps its image.
- registry: push once, every host pulls (labfleet/registry.py).
"""

from __future__ import annotations

import shlex
import shutil
import threading
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.operations import files

from labfleet import archives, image, jupyter
from labfleet.facts.image import ImageId, LayerChains
from labfleet.facts.system import FreeBytes
from labfleet.planning import planned, prefetch
from labfleet.preflight import require
from labfleet.settings import REPO_ROOT, Settings

CONTEXT_CACHE_DIR = REPO_ROOT / "build" / "contexts"
HOST_CONTEXT_DIR = "/opt/labfleet/image"
HOST_ARCHIVE_DIR = "/var/tmp"
DOCKER_ROOT = "/var/lib/docker"

_lock = threading.Lock()  # hosts are prepared concurrently; the controller builds once
_contexts: dict[str, Path] = {}


def built_on_controller(settings: Settings) -> str:
    """Build the image once on the controller (skipped when its engine has the tag).

    Asked through archives' inspect, which remembers an image it found: every host plans
    this under the lock, and a CLI start per host made ten hosts wait on ten in a row.
    """
    tag = image.image_tag(settings)
    with _lock:
        if not archives.controller_has(tag):
            image.build_image(settings)
        return tag


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
    check = f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)}"
    yield (
        f"docker load --input {quoted} >/dev/null; loaded=$?; rm -f {quoted}; "
        f'[ $loaded -eq 0 ] && [ "$({check})" = {shlex.quote(image_id)} ] || '
        f"{{ echo {shlex.quote(f'labfleet: loading {ref} did not give image {image_id}')} >&2; exit 1; }}"
    )


@deploy("Ship an image")
def ship(settings: Settings, ref: str):
    archive = archives.saved_archive(ref)
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
    files.put(name=f"Copy {ref}", src=str(source), dest=remote, mode="600")
    load_image(name=f"Load {ref}", archive=remote, ref=ref, image_id=archive.image_id)


def _gib(value: int | None) -> str:
    return "an unknown amount" if value is None else f"{value / 2**30:.1f} GiB"


def _context(settings: Settings) -> Path:
    tag = image.image_tag(settings)
    with _lock:
        if tag not in _contexts:
            directory = CONTEXT_CACHE_DIR / tag.rsplit(":", 1)[1]
            if directory.exists():
                shutil.rmtree(directory)
            _contexts[tag] = image.assemble_context(settings, directory)
        return _contexts[tag]


@operation(is_idempotent=True)
def build_on_host(context: str, tag: str, build_args: dict[str, str]):
    """Build the image on the host from a synced context, unless it has the tag already.

    + context: the build context's directory on the host
    + tag: the computed tag
    + build_args: --build-arg values
    """
    if host.get_fact(ImageId, ref=tag):
        host.noop(f"{tag} is already built")
        return
    args = " ".join(f"--build-arg {shlex.quote(f'{k}={v}')}" for k, v in sorted(build_args.items()))
    yield f"docker build --force-rm --tag {shlex.quote(tag)} {args} {shlex.quote(context)} 2>&1 | tail -n 40"
    # `| tail` hides docker's exit code; the tag's presence is the real result.
    yield f"docker image inspect {shlex.quote(tag)} >/dev/null"


@deploy("Build the image on the host")
def build(settings: Settings, tag: str):
    if planned_image_id(settings, tag):
        host.noop(f"{tag} is already built")
        return
    if not planned(ImageId, ref=settings.base_image) and archives.controller_has(settings.base_image):
        ship(settings, settings.base_image)
    files.sync(
        name="Sync the image's build context",
        src=str(_context(settings)),
        dest=HOST_CONTEXT_DIR,
        delete=True,
    )
    build_on_host(
        name=f"Build {tag}",
        context=HOST_CONTEXT_DIR,
        tag=tag,
        build_args=image.build_args(settings),
    )


def state_parts(settings: Settings) -> tuple:
    """What the image and bring-up steps decide from while planning: the containers and the tag's id
    (jupyter.ComposeService reads both), and in build mode the base image's id."""
    base = ((ImageId, {"ref": settings.base_image}),) if settings.image_delivery == "build" else ()
    return (*base, *jupyter.state_parts(settings))


def planned_image_id(settings: Settings, ref: str) -> str | None:
    """The id ref names on the host, as read while planning.

    The lab image's id comes with the bring-up's reading of its container (one `docker
    inspect` of both), so it costs the host no command of its own.
    """
    if ref == image.image_tag(settings):
        _, (fact, kwargs), *_ = jupyter.state_parts(settings)
        return planned(fact, **kwargs)["image_id"]
    return planned(ImageId, ref=ref)


@deploy("Deliver the image")
def deliver_image(settings: Settings):
    prefetch(state_parts(settings))
    if settings.image_delivery == "build":
        build(settings, image.image_tag(settings))
        return
    tag = built_on_controller(settings)
    if settings.image_delivery == "ship":
        ship(settings, tag)
    else:
        from labfleet import registry  # registry delivery builds on ship

        registry.deliver(settings, tag)
