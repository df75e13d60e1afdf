"""Directories and small files that labfleet keeps on a host, planned from the step's snapshot.

Each is pyinfra's own ``files.directory`` or ``files.put``, skipped through
``planning.unless_current`` when the snapshot's PathStates show it exactly as wanted (kind,
owner, mode and, for a file, its sha1).
"""

from __future__ import annotations

import hashlib
import posixpath
import shlex
from io import StringIO

from pyinfra.operations import files, systemd

from labfleet.facts.system import PathState, path_is
from labfleet.planning import unless_current


def text_sha1(text: str) -> str:
    """The sha1 PathStates reports for a file holding text."""
    return hashlib.sha1(text.encode()).hexdigest()


def note_command(path: str, text: str) -> str:
    """A shell command that writes text to path, its directory made first (0755): a note that a later run reads."""
    directory = shlex.quote(posixpath.dirname(path))
    return f"install -d -m 0755 {directory} && printf %s {shlex.quote(text)} > {shlex.quote(path)}"


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


def controller_file(states: dict[str, PathState], name: str, local: str, dest: str, user: str, group: str, mode: str):
    """``files.put`` of a file on the controller (a secret: its content is never in an argument or the
    output), unless the snapshot shows that content, owner and mode at dest."""
    with open(local, "rb") as handle:
        sha1 = hashlib.sha1(handle.read()).hexdigest()
    return unless_current(
        files.put,
        current=path_is(states, dest, "file", user, group, mode, sha1),
        name=name,
        src=local,
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
