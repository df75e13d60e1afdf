"""Directories and small files that labfleet keeps on a host, planned from the step's snapshot.

Each is pyinfra's own ``files.directory`` or ``files.put``, skipped through
``planning.unless_current`` when the snapshot's PathStates show it exactly as wanted (kind,
owner, mode and, for a file, its sha1).
"""

from __future__ import annotations

import hashlib
from io import StringIO

from pyinfra.operations import files, systemd

from labfleet.facts.system import PathState, path_is
from labfleet.planning import unless_current


def text_sha1(text: str) -> str:
    """The sha1 PathStates reports for a file holding text."""
    return hashlib.sha1(text.encode()).hexdigest()


def directory(states: dict[str, PathState], name: str, path: str, user: str, group: str, mode: str):
    """``files.directory`` of path, unless the snapshot shows it as wanted."""
    return unless_current(
        files.directory,
        current=path_is(states, path, "directory", user, group, mode),
        name=name,
        path=path,
        user=user,
        group=group,
        mode=mode,
    )


def text_file(states: dict[str, PathState], name: str, text: str, dest: str, user: str, group: str, mode: str):
    """``files.put`` of text to dest, unless the snapshot shows that content, owner and mode there."""
    return unless_current(
        files.put,
        current=path_is(states, dest, "file", user, group, mode, text_sha1(text)),
        name=name,
        src=StringIO(text),
        dest=dest,
        user=user,
        group=group,
        mode=mode,
    )


def systemd_units(states: dict[str, PathState], units: dict[str, str], reload_name: str) -> None:
    """Unit files (path -> text, root's, 0644) and one ``systemctl daemon-reload`` when any of them changed."""
    written = []
    for path, text in units.items():
        result = text_file(states, f"Write {path}", text, path, "root", "root", "644")
        if result is not None:
            written.append(result)
    if written:
        systemd.daemon_reload(name=reload_name, _if=lambda: any(unit.did_change() for unit in written))
