"""Facts about images on a host's engine (labfleet.delivery, labfleet.registry)."""

from __future__ import annotations

import json
import shlex

from pyinfra.api import FactBase


class ImageId(FactBase):
    """The id of the image a reference names on this host, or None."""

    def requires_command(self, *args, **kwargs) -> str:
        return "docker"

    def command(self, ref: str) -> str:
        return f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)} 2>/dev/null || true"

    def process(self, output):
        return output[0].strip() if output and output[0].startswith("sha256:") else None


class LayerChains(FactBase):
    """The chain ids of every layer the host's engine has, or None on the containerd image store.

    Only the classic image store loads an archive that leaves out layers the engine has
    (labfleet.archives); with None, hosts get whole archives.
    """

    def requires_command(self, *args, **kwargs) -> str:
        return "docker"

    def command(self) -> str:
        return (
            "if docker info --format '{{json .DriverStatus}}' | grep -q io.containerd.snapshotter; "
            "then echo containerd; else docker image ls --all --quiet --no-trunc | sort -u "
            "| xargs -r docker image inspect --format '{{json .RootFS.Layers}}'; fi"
        )

    def process(self, output):
        return parse_layer_chains(output)


def parse_layer_chains(lines) -> set[str] | None:
    from labfleet.archives import chain_ids

    if any(line.strip() == "containerd" for line in lines):
        return None
    chains: set[str] = set()
    for line in lines:
        if line.startswith("["):
            chains.update(chain_ids(json.loads(line)))
    return chains
