"""Facts about images on a host's engine (labfleet.delivery, labfleet.registry)."""

from __future__ import annotations

import json
import shlex
from typing import TypedDict

from pyinfra.api import FactBase


class ImageId(FactBase):
    """The id of the image a reference names on this host, or None."""

    def requires_command(self, *args, **kwargs) -> str:
        return "docker"

    def command(self, ref: str) -> str:
        return f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)} 2>/dev/null || true"

    def process(self, output):
        return output[0].strip() if output and output[0].startswith("sha256:") else None


FILL_FAILED_MARKER = "/var/lib/labfleet/ship-fill-failed"


class ImageLayers(TypedDict):
    """One image of a host's engine: its id, its size and its layers' diff ids, bottom first."""

    id: str
    size: int
    layers: list[str]


class EngineLayers(TypedDict):
    """What a host's engine holds, as `ship` decides what to send (labfleet.archives.plan_layers).

    store: "classic" or "containerd" (the containerd image store, which loads only whole
    archives); version: the engine's; fill_failed: an earlier copy of layers from the host's
    own images failed there (FILL_FAILED_MARKER), so it gets every layer it lacks by chain.
    """

    store: str
    version: str
    fill_failed: bool
    images: list[ImageLayers]


class HostEngineLayers(FactBase):
    """The diff ids of every image in the host's engine, and what its engine can do with them."""

    def requires_command(self, *args, **kwargs) -> str:
        return "docker"

    def command(self) -> str:
        return (
            "info=$(docker info --format '{{.ServerVersion}} {{json .DriverStatus}}'); "
            'echo "version ${info%% *}"; '
            'case "$info" in *io.containerd.snapshotter*) echo containerd;; esac; '
            f"[ -e {FILL_FAILED_MARKER} ] && echo fill-failed; "
            "docker image ls --all --quiet --no-trunc | sort -u "
            "| xargs -r docker image inspect --format '{{.Id}} {{.Size}} {{json .RootFS.Layers}}' 2>/dev/null; "
            # An image removed between the listing and its inspection is one the host no longer
            # has: the others are still printed, and the fact must not fail the host for it.
            "true"
        )

    def process(self, output) -> EngineLayers:
        return parse_engine_layers(output)


def parse_engine_layers(lines) -> EngineLayers:
    found = EngineLayers(store="classic", version="", fill_failed=False, images=[])
    for line in lines:
        line = line.strip()
        if line.startswith("version "):
            found["version"] = line.removeprefix("version ").strip()
        elif line == "containerd":
            found["store"] = "containerd"
        elif line == "fill-failed":
            found["fill_failed"] = True
        elif line.startswith("sha256:"):
            image, size, layers = line.split(" ", 2)
            found["images"].append(ImageLayers(id=image, size=int(size), layers=json.loads(layers)))
    return found
