"""Facts about backups (labfleet.backup): the repository, its snapshots, and the last run's summary.

The repository is read only by the deploy, through the host's own ``labfleet-restic`` wrapper
(which knows the repository, its password file and its SSH options); the status never reaches
the repository: it reads the small summary files the backup service leaves on the host.
"""

from __future__ import annotations

import json
import shlex
from typing import TypedDict

from pyinfra.api import FactBase

BACKUP_DIR = "/opt/labfleet/backup"
RESTIC = f"{BACKUP_DIR}/labfleet-restic"
STATE_DIR = "/var/lib/labfleet/backup"
LAST_RUN = f"{STATE_DIR}/last-run.json"
LAST_SUCCESS = f"{STATE_DIR}/last-success.json"
# Written when the backups are set up; before the first snapshot, its age is what status measures.
SINCE = f"{STATE_DIR}/configured"
# restic >= 0.17 exits with 10 when there is no repository at the location.
NO_REPOSITORY_EXIT = 10


def _exit_line(output) -> tuple[list[str], int | None]:
    lines = [line.rstrip() for line in output]
    code = None
    if lines and lines[-1].startswith("exit ") and lines[-1][5:].isdigit():
        code = int(lines.pop()[5:])
    return lines, code


def error_text(lines: list[str], limit: int = 400) -> str:
    """What restic (and ssh under it) said went wrong, on one line."""
    said = [line.strip() for line in lines if line.strip()]
    picked = [line for line in said if line.startswith(("Fatal:", "ssh:", "subprocess ssh:", "error", "Error"))]
    return "; ".join(picked or said[-2:])[:limit] or "restic failed and printed nothing"


class RepositoryState(TypedDict):
    state: str  # "exists", "missing", "error", or "unavailable" (no labfleet-restic on the host yet)
    error: str


def parse_repository(output) -> RepositoryState:
    lines, code = _exit_line(output)
    if code is None:
        return RepositoryState(state="unavailable", error="")
    if code == 0:
        return RepositoryState(state="exists", error="")
    text = " ".join(lines)
    if code == NO_REPOSITORY_EXIT or "Is there a repository at the following location?" in text:
        return RepositoryState(state="missing", error=error_text(lines))
    return RepositoryState(state="error", error=error_text(lines))


class ResticRepository(FactBase[RepositoryState]):
    """Whether the host's backup repository exists (``restic cat config``), is missing, or cannot be opened.

    Returns ``{"state": "exists" | "missing" | "error" | "unavailable", "error": str}``.
    """

    @staticmethod
    def default() -> RepositoryState:
        return RepositoryState(state="unavailable", error="")

    def command(self) -> str:
        restic = shlex.quote(RESTIC)
        return f'[ -x {restic} ] || exit 0; {restic} cat config 2>&1 >/dev/null; echo "exit $?"'

    def process(self, output) -> RepositoryState:
        return parse_repository(output)


class Snapshot(TypedDict):
    id: str
    time: str
    hostname: str
    paths: list[str]
    tags: list[str]


class SnapshotsState(TypedDict):
    state: str  # "read", "error" or "unavailable"
    error: str
    snapshots: list[Snapshot]


def parse_snapshots(output) -> SnapshotsState:
    lines, code = _exit_line(output)
    if code is None:
        return SnapshotsState(state="unavailable", error="", snapshots=[])
    if code != 0:
        return SnapshotsState(state="error", error=error_text(lines), snapshots=[])
    found: list[Snapshot] = []
    for line in lines:
        if not line.startswith("["):
            continue
        try:
            listed = json.loads(line)
        except ValueError:
            return SnapshotsState(state="error", error="restic printed a snapshot list that is not JSON", snapshots=[])
        for item in listed:
            found.append(
                Snapshot(
                    id=str(item.get("id", "")),
                    time=str(item.get("time", "")),
                    hostname=str(item.get("hostname", "")),
                    paths=[str(path) for path in item.get("paths") or []],
                    tags=[str(tag) for tag in item.get("tags") or []],
                )
            )
    return SnapshotsState(state="read", error="", snapshots=found)


def latest(snapshots: list[Snapshot], user: str, kind: str) -> Snapshot | None:
    """The newest snapshot of one user's workspace or home (restic's times sort as text within one zone)."""
    tags = {f"user:{user}", f"kind:{kind}"}
    mine = [snap for snap in snapshots if tags <= set(snap["tags"]) and len(snap["paths"]) == 1]
    return max(mine, key=lambda snap: snap["time"], default=None)


class ResticSnapshots(FactBase[SnapshotsState]):
    """labfleet's snapshots of one host in the repository.

    + source: the host name the snapshots were taken on (restic ``--host``)

    Returns ``{"state": "read" | "error" | "unavailable", "error": str, "snapshots": [...]}``,
    each snapshot ``{"id", "time", "hostname", "paths", "tags"}``.
    """

    @staticmethod
    def default() -> SnapshotsState:
        return SnapshotsState(state="unavailable", error="", snapshots=[])

    def command(self, source: str) -> str:
        restic = shlex.quote(RESTIC)
        return (
            f"[ -x {restic} ] || exit 0; "
            f'{restic} snapshots --json --no-lock --host {shlex.quote(source)} --tag labfleet 2>&1; echo "exit $?"'
        )

    def process(self, output) -> SnapshotsState:
        return parse_snapshots(output)


class BackupSummaryState(TypedDict):
    now: int | None  # the host's clock, so that ages do not depend on the controller's
    since: int | None  # when the backups were set up (mtime of SINCE)
    last_run: dict | None  # {"time", "ok", "error"?}
    last_success: dict | None  # {"time", "snapshots": [{"user", "kind", "path", "summary": restic's}]}


def parse_summary(output) -> BackupSummaryState:
    found = BackupSummaryState(now=None, since=None, last_run=None, last_success=None)
    for line in output:
        key, _, value = line.strip().partition(" ")
        if key in ("now", "since") and value.isdigit():
            found[key] = int(value)  # type: ignore[literal-required]
        elif key in ("last_run", "last_success"):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = {"time": None, "ok": False, "error": f"{key.replace('_', '-')}.json is not JSON"}
            found[key] = parsed if isinstance(parsed, dict) else None  # type: ignore[literal-required]
    return found


def backup_bytes(last_success: dict | None) -> int | None:
    """The size of what the last successful run backed up: the sum of restic's total_bytes_processed."""
    if not last_success:
        return None
    sizes = [(item.get("summary") or {}).get("total_bytes_processed") for item in last_success.get("snapshots", [])]
    return sum(size for size in sizes if isinstance(size, int))


class BackupSummary(FactBase[BackupSummaryState]):
    """What the backup service left on the host after its last run, and the host's clock.

    Returns ``{"now", "since", "last_run", "last_success"}`` (None where absent).
    """

    @staticmethod
    def default() -> BackupSummaryState:
        return BackupSummaryState(now=None, since=None, last_run=None, last_success=None)

    def command(self) -> str:
        run, success, since = (shlex.quote(path) for path in (LAST_RUN, LAST_SUCCESS, SINCE))
        return (
            'echo "now $(date +%s)"; '
            f'[ -e {since} ] && echo "since $(stat -c %Y {since})"; '
            f'[ -r {run} ] && echo "last_run $(tr -d "\\n" < {run})"; '
            f'[ -r {success} ] && echo "last_success $(tr -d "\\n" < {success})"; true'
        )

    def process(self, output) -> BackupSummaryState:
        return parse_summary(output)
