"""Facts only the fleet status reads (labfleet.report)."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase

from labfleet.facts.jupyter import ComposeService


class ToolkitVersion(FactBase):
    """The installed nvidia-container-toolkit package version, or None."""

    def command(self) -> str:
        return "dpkg-query -W -f '${db:Status-Abbrev} ${Version}\\n' nvidia-container-toolkit 2>/dev/null; true"

    def process(self, output):
        for line in output:
            parts = line.split()
            if len(parts) == 2 and parts[0] == "ii":
                return parts[1]
        return None


class ProjectContainer(ComposeService):
    """ComposeService plus the container's restart count (``restarts``, None without a container)."""

    @staticmethod
    def default():
        return {**ComposeService.default(), "restarts": None}

    def process(self, output):
        state, container = self.read(output)
        restarts = container.get("RestartCount") if container else None
        return {**state, "restarts": restarts if isinstance(restarts, int) else None}


class DatasetStates(FactBase):
    """The sync state of each dataset: ``{name: state}``.

    + entries: ``(name, directory, manifest path or "", stamp path, is a mount)`` per dataset

    States: ``missing`` (no directory), ``mounted`` / ``not-mounted`` (nfs), ``ok`` (its
    manifest passed since the last sync), ``unverified`` (the manifest changed or a sync
    moved files since), ``no-manifest`` (a manifest is configured but absent), ``present``
    (a directory without a manifest to check).
    """

    @staticmethod
    def default():
        return {}

    def command(self, entries) -> str:
        checks = []
        for name, directory, manifest, stamp, mount in entries:
            d, n = shlex.quote(directory), shlex.quote(name)
            if mount:
                inner = f"if mountpoint -q {d}; then s=mounted; else s=not-mounted; fi"
            elif manifest:
                inner = (
                    f"m=$(sha256sum < {shlex.quote(manifest)} 2>/dev/null | cut -d' ' -f1); "
                    f"t=$(cat {shlex.quote(stamp)} 2>/dev/null); "
                    'if [ -z "$m" ]; then s=no-manifest; elif [ "$m" = "$t" ]; then s=ok; else s=unverified; fi'
                )
            else:
                inner = "s=present"
            checks.append(f'if [ -d {d} ]; then {inner}; else s=missing; fi; echo "dataset {n} $s"')
        return "; ".join([*checks, "true"])

    def process(self, output):
        found = {}
        for line in output:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "dataset":
                found[parts[1]] = parts[2]
        return found
