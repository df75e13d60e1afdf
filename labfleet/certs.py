"""Extra CA certificates, for labs behind TLS-inspecting proxies.

The same PEM files are trusted by the hosts (here) and by image builds (the image step
copies them into the build context), so pip and apt work behind the proxy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import FindFiles
from pyinfra.operations import apt, files, server
from pyinfra.operations.util import any_changed

from labfleet.facts.system import PathStates, path_is
from labfleet.planning import plan_unless_current, planned
from labfleet.settings import Settings

CA_DIR = "/usr/local/share/ca-certificates/labfleet"


def host_file_name(path: str) -> str:
    """A stable, collision-free name: update-ca-certificates only reads *.crt."""
    data = Path(path).read_bytes()
    return f"{Path(path).stem}-{hashlib.sha256(data).hexdigest()[:8]}.crt"


def _sha1(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def state_parts(settings: Settings) -> tuple:
    """The facts this step decides from while planning (preflight reads them with its own)."""
    uploads = tuple(f"{CA_DIR}/{host_file_name(path)}" for path in settings.extra_ca_certificates)
    parts: tuple = (
        (FindFiles, {"path": CA_DIR, "quote_path": True}),
        (PathStates, {"paths": (CA_DIR, *uploads), "digests": uploads}),
    )
    return (*parts, (DebPackages, {})) if uploads else parts


@deploy("Trust extra CA certificates")
def trust_extra_ca_certificates(settings: Settings):
    wanted = {host_file_name(path): path for path in settings.extra_ca_certificates}
    (find, find_kwargs), (path_states, states_kwargs), *_ = state_parts(settings)
    present = planned(find, **find_kwargs) or []
    if not wanted and not present:
        host.noop("no extra CA certificates")
        return

    if wanted and "ca-certificates" not in planned(DebPackages):
        apt.packages(name="Install ca-certificates", packages=["ca-certificates"], update=True)

    # Operations that the state read while planning shows current read nothing when they run.
    states = planned(path_states, **states_kwargs)
    changes = [
        plan_unless_current(
            files.directory,
            path_is(states, CA_DIR, "directory", mode="755"),
            name="Create the labfleet CA directory",
            path=CA_DIR,
            mode="755",
        )
    ]
    for name, path in sorted(wanted.items()):
        dest = f"{CA_DIR}/{name}"
        changes.append(
            plan_unless_current(
                files.put,
                path_is(states, dest, "file", mode="644", sha1=_sha1(path)),
                name=f"Upload CA {name}",
                src=path,
                dest=dest,
                mode="644",
            )
        )
    for stale in sorted(set(present) - {f"{CA_DIR}/{name}" for name in wanted}):
        changes.append(files.file(name=f"Remove CA {Path(stale).name}, no longer listed", path=stale, present=False))
    changes = [change for change in changes if change is not None]
    if changes:
        server.shell(
            name="Refresh the host's trust store",
            commands=["update-ca-certificates"],
            _if=any_changed(*changes),
        )
