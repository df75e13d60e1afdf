"""Extra CA certificates, for labs behind TLS-inspecting proxies.

The same PEM files are trusted by the hosts (here) and by image builds (the image step
copies them into the build context), so pip and apt work behind the proxy.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pyinfra import host
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import FindFiles
from pyinfra.operations import files, server
from pyinfra.operations.util import any_changed

from labfleet import apt, planning
from labfleet.facts.system import PathState, PathStates, path_is
from labfleet.planning import Read, step
from labfleet.settings import Settings

CA_DIR = "/usr/local/share/ca-certificates/labfleet"


def host_file_name(path: str) -> str:
    """A stable, collision-free name: update-ca-certificates only reads *.crt."""
    data = Path(path).read_bytes()
    return f"{Path(path).stem}-{hashlib.sha256(data).hexdigest()[:8]}.crt"


def _sha1(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class CertsHost:
    """What this step decides from: the CA files labfleet put on the host, and their states.

    ``packages`` is read only where there are certificates to trust (for ca-certificates).
    """

    present: list[str] | None
    paths: dict[str, PathState]
    packages: dict[str, list[str]] | None = None


def reads(settings: Settings) -> dict[str, Read]:
    """The facts this step decides from, by CertsHost field."""
    uploads = tuple(f"{CA_DIR}/{host_file_name(path)}" for path in settings.extra_ca_certificates)
    found = {
        "present": Read(FindFiles, {"path": CA_DIR, "quote_path": True}),
        "paths": Read(PathStates, {"paths": (CA_DIR, *uploads), "digests": uploads}),
    }
    if uploads:
        found["packages"] = Read(DebPackages)
    return found


@step("Trust extra CA certificates")
def trust_extra_ca_certificates(settings: Settings):
    wanted = {host_file_name(path): path for path in settings.extra_ca_certificates}
    state = planning.snapshot(CertsHost, reads(settings))
    present = state.present or []
    if not wanted and not present:
        host.noop("no extra CA certificates")
        return

    if wanted:
        planning.unless_current(
            apt.ensure_packages,
            current=not apt.missing_packages(["ca-certificates"], state.packages or {}),
            name="Install ca-certificates",
            packages=["ca-certificates"],
        )
    changes = [
        planning.unless_current(
            files.directory,
            current=path_is(state.paths, CA_DIR, "directory", mode="755"),
            name="Create the labfleet CA directory",
            path=CA_DIR,
            mode="755",
        )
    ]
    for name, path in sorted(wanted.items()):
        dest = f"{CA_DIR}/{name}"
        changes.append(
            planning.unless_current(
                files.put,
                current=path_is(state.paths, dest, "file", mode="644", sha1=_sha1(path)),
                name=f"Upload CA {name}",
                src=path,
                dest=dest,
                mode="644",
            )
        )
    for stale in sorted(set(present) - {f"{CA_DIR}/{name}" for name in wanted}):
        changes.append(files.file(name=f"Remove CA {Path(stale).name}, no longer listed", path=stale, present=False))
    planned = [change for change in changes if change is not None]
    if planned:
        server.shell(
            name="Refresh the host's trust store",
            commands=["update-ca-certificates"],
            _if=any_changed(*planned),
        )
