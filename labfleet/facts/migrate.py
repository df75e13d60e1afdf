"""Facts about migrations from an old PC (labfleet.migrate): its cut-over markers, what a pull would move."""

from __future__ import annotations

import shlex
from typing import TypedDict

from pyinfra.api import FactBase

from labfleet.facts.datasets import parse_rsync_itemized

DONE = "labfleet-migrated"


class MarkerFact(FactBase[dict[str, str | None]]):
    """Which JupyterLab projects were migrated away from this host, and to where.

    + markers: (user, marker file) of each project

    Returns ``{user: new host or None}``: the first word of the user's marker file, which the
    cut-over writes on the old PC (``<new host> at <UTC time>``).
    """

    @staticmethod
    def default() -> dict[str, str | None]:
        return {}

    def command(self, markers: tuple[tuple[str, str], ...]) -> str:
        self.users = tuple(user for user, _ in markers)
        checks = [
            f"[ -f {shlex.quote(path)} ] && echo marker {shlex.quote(user)} $(head -c 256 {shlex.quote(path)})"
            for user, path in markers
        ]
        return "; ".join([*checks, "true"])

    def process(self, output) -> dict[str, str | None]:
        return parse_markers(output, getattr(self, "users", ()))


def parse_markers(output, users=()) -> dict[str, str | None]:
    found: dict[str, str | None] = dict.fromkeys(users)
    for line in output:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "marker":
            found[parts[1]] = parts[2] if len(parts) > 2 else None
    return found


class PendingPull(TypedDict):
    done: bool  # the final pass from this old PC completed: nothing is read from it any more
    rc: int  # the dry run's exit status (0 when done)
    changes: list[str]  # rsync's itemized lines, the top directory's own attributes left out
    errors: list[str]


class MigrationPending(FactBase[PendingPull]):
    """What pulling a user's files from the old PC would move: an rsync dry run, unless the final pass is done.

    + command: the pull's rsync command line, with --itemize-changes and without --dry-run
    + stamp: the file the final pass writes, holding the old PC's name
    + old: the old PC's inventory name

    Returns ``{"done", "rc", "changes", "errors"}``. The dry run walks the old PC's tree and
    sends its file list (no file data); after the final pass it is not run at all.
    """

    @staticmethod
    def default() -> PendingPull:
        return PendingPull(done=False, rc=1, changes=[], errors=["nothing was read"])

    def command(self, command: str, stamp: str, old: str) -> str:
        return (
            f'if [ "$(cat {shlex.quote(stamp)} 2>/dev/null)" = {shlex.quote(old)} ]; then echo {DONE}; exit 0; fi; '
            f'{command} --dry-run 2>&1; echo "labfleet-rc=$?"'
        )

    def process(self, output) -> PendingPull:
        return parse_pending(list(output))


def parse_pending(lines: list[str]) -> PendingPull:
    """A dry run's itemized lines, without the top directory's: its owner and mode are the new PC's layout's."""
    if any(line.strip() == DONE for line in lines):
        return PendingPull(done=True, rc=0, changes=[], errors=[])
    parsed = parse_rsync_itemized(lines)
    changes = [line for line in parsed["changes"] if line.split(" ", 1)[-1].strip() != "./"]
    return PendingPull(done=False, rc=parsed["rc"], changes=changes, errors=parsed["errors"])
