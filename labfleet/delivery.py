"""Image delivery: the lab image on every host, under its tag, moving bytes only where needed.

- build: the build context is synced to /opt/labfleet/image (changed files only) and the
  host builds it, unless it already has the tag. A base image that only the controller
  has (offline labs, the tests) is shipped first.
- ship: the controller builds once and saves once (zstd; gzip where it lacks zstd); only
  hosts whose engine lacks that image id get the archive, less the layers they already have
  in any image (labfleet/archives.py, labfleet/shipping.py),
  `docker load` it, and have the id verified. A failed or interrupted load never moves the
  tag, so the running container keeps its image.
- registry: push once, every host pulls (labfleet/registry.py).

Builds, saves, copies, loads, pulls and pushes print a progress line per host while they run
(labfleet/progress.py).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import files

from labfleet import archives, image, jupyter, progress, registry, shipping
from labfleet.facts.image import ImageId
from labfleet.planning import Read, current_run, step
from labfleet.settings import REPO_ROOT, Settings

CONTEXT_CACHE_DIR = REPO_ROOT / "build" / "contexts"
HOST_CONTEXT_DIR = "/opt/labfleet/image"
BUILD_LOG = "/var/tmp/labfleet-build.log"


def built_on_controller(settings: Settings) -> str:
    """Build the image once per run on the controller (skipped when its engine has the tag).

    Every host plans this; the run's ControllerImages remembers an image it found, since a
    CLI start per host made ten hosts wait on ten in a row.
    """
    tag = image.image_tag(settings)
    controller = archives.controller()
    with controller.lock:
        if not controller.has(tag):
            image.build_image(settings)
            controller.inspected.pop(tag, None)
    return tag


def _context(settings: Settings) -> Path:
    """The build context of this tag, assembled once per run on the controller."""
    tag = image.image_tag(settings)

    def assemble() -> Path:
        directory = CONTEXT_CACHE_DIR / tag.rsplit(":", 1)[1]
        if directory.exists():
            shutil.rmtree(directory)
        return image.assemble_context(settings, directory)

    return current_run().once(f"build context {tag}", assemble)


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
    log = shlex.quote(BUILD_LOG)
    # The whole log is kept while the build runs: its last step line is the build's progress.
    yield progress.WatchedCommand(
        f"docker build --force-rm --tag {shlex.quote(tag)} {args} {shlex.quote(context)} 2>&1 "
        f"| tee {log} | tail -n 40; rm -f {log}",
        what=f"Build {tag}",
        unit="steps",
        question=progress.build_step_question(log),
        answer=progress.build_step_answer,
    )
    # `| tail` hides docker's exit code; the tag's presence is the real result.
    yield f"docker image inspect {shlex.quote(tag)} >/dev/null"


@step("Build the image on the host")
def build(settings: Settings, tag: str):
    if shipping.planned_image_id(settings, tag):
        host.noop(f"{tag} is already built")
        return
    if not shipping.planned_image_id(settings, settings.base_image) and archives.controller().has(settings.base_image):
        shipping.ship(settings, settings.base_image)
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


def reads(settings: Settings) -> dict[str, Read]:
    """What delivery decides from: the id the lab image's tag names (the bring-up's reading of
    each container asks for it too, so it costs no command of its own), and in build mode
    the base image's id."""
    found = {"image": Read(ImageId, {"ref": settings.base_image})} if settings.image_delivery == "build" else {}
    return {**found, **jupyter.reads(settings)}


@step("Deliver the image")
def deliver_image(settings: Settings):
    if settings.image_delivery == "build":
        build(settings, image.image_tag(settings))
        return
    tag = built_on_controller(settings)
    if settings.image_delivery == "ship":
        shipping.ship(settings, tag)
    else:
        registry.deliver(settings, tag)
