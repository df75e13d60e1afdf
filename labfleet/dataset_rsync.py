"""The rsync options and messages that pushes (labfleet.dataset_push), pulls (labfleet.dataset_pull)
and migrations (labfleet.migrate) share, in a module that imports none of them, so that each can
use them without an import cycle: the same options on every path keep a pushed copy and a pulled
copy of one dataset alike.
"""

from __future__ import annotations

from labfleet.settings import Dataset


def one_line(lines: list[str], limit: int = 1000) -> str:
    """What rsync said, on one line (its last limit characters): an error message is one line."""
    return " ".join(line.strip() for line in lines if line.strip())[-limit:]


def rsync_flags(dataset: Dataset, group: str) -> list[str]:
    """rsync options shared by pushes and pulls.

    Owner, group and modes come from the layout, not from the source machine: a controller's
    uid means nothing on a host. Directory times are left alone, so a file a member adds to
    a writable dataset does not make the next run "fix" its directory. No --inplace and no
    --partial: rsync writes a temporary file and renames it once it is complete.
    """
    chmod = "D2755,Fu+rw,Fgo+r,Fgo-w" if dataset.readonly else "D2775,Fug+rw,Fo+r,Fo-w"
    flags = [
        "--recursive",
        "--links",
        "--times",
        "--omit-dir-times",
        "--perms",
        f"--chmod={chmod}",
        f"--chown=root:{group}",
        "--itemize-changes",
    ]
    if dataset.prune:
        flags.append("--delete")
    return flags


def _remote(user: str | None, address: str, path: str) -> str:
    address = f"[{address}]" if ":" in address else address
    return f"{user}@{address}:{path}" if user else f"{address}:{path}"
