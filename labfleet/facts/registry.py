"""Facts about the lab registry (labfleet.registry)."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class RegistryHasTag(FactBase):
    """Whether the registry on this host's loopback serves a manifest for the tag."""

    def command(self, port: int, tag: str) -> str:
        repository, reference = tag.rsplit(":", 1)
        url = f"http://127.0.0.1:{int(port)}/v2/{repository}/manifests/{reference}"
        accept = "application/vnd.docker.distribution.manifest.v2+json"
        return f"curl -fsS -o /dev/null -I -H {shlex.quote('Accept: ' + accept)} {shlex.quote(url)} && echo yes || true"

    def process(self, output):
        return bool(output) and output[-1].strip() == "yes"
