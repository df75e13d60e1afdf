"""Checksums of every file under some directories of a host, for data-safety assertions.

before = checksum_snapshot(host, ["/srv/workspace", "/srv/datasets"])
... deploy, upgrade, fail a run ...
assert_files_preserved(before, checksum_snapshot(host, [...]), host=host.name)
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from .hosts import TestHost, host_exec

_SHA_SECTION = "--labfleet-sha256--"


class FileState(NamedTuple):
    sha256: str
    mode: str  # octal permission bits, e.g. "0644"
    uid: int
    gid: int


Snapshot = dict[str, FileState]


def checksum_snapshot(host: TestHost, paths: Iterable[str], missing_ok: bool = False) -> Snapshot:
    """Map every regular file under paths on host to its (sha256, mode, uid, gid).

    One `docker exec` runs find and sha256sum as root. A path that does not exist is an
    error unless missing_ok, so that a typo cannot make a data-safety check pass vacuously.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("checksum_snapshot needs at least one path")
    quoted = " ".join(shlex.quote(path) for path in paths)
    check = (
        "" if missing_ok else f'for p in {quoted}; do [ -e "$p" ] || {{ echo "no such path: $p" >&2; exit 3; }}; done; '
    )
    # With missing_ok, find reports the absent paths on stderr and lists the others.
    script = (
        f"{check}"
        f"find {quoted} -type f -printf '%p\\0%m\\0%U\\0%G\\0' 2>/dev/null; "
        f"printf '%s\\0' {_SHA_SECTION}; "
        f"find {quoted} -type f -print0 2>/dev/null | xargs -0 -r sha256sum --zero"
    )
    output = host_exec(host, script, timeout=600).stdout
    return _parse(output)


def _parse(output: str) -> Snapshot:
    records = output.split("\0")
    if _SHA_SECTION not in records:
        return {}
    split = records.index(_SHA_SECTION)
    stats, sums = records[:split], records[split + 1 :]
    states = {}
    for start in range(0, len(stats) - 3, 4):
        path, mode, uid, gid = stats[start : start + 4]
        states[path] = (f"{int(mode, 8):04o}", int(uid), int(gid))
    digests = {}
    for line in sums:
        if line:
            digest, _, path = line.partition("  ")
            digests[path] = digest
    return {path: FileState(digests.get(path, ""), mode, uid, gid) for path, (mode, uid, gid) in sorted(states.items())}


@dataclass
class SnapshotDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, tuple[FileState, FileState]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        lines = [f"removed: {path}" for path in self.removed]
        for path, (old, new) in self.changed.items():
            what = [
                f"{name} {getattr(old, name)} -> {getattr(new, name)}"
                for name in FileState._fields
                if getattr(old, name) != getattr(new, name)
            ]
            lines.append(f"changed: {path} ({', '.join(what)})")
        lines += [f"added: {path}" for path in self.added]
        return "\n".join(lines)


def diff_snapshots(before: Mapping[str, FileState], after: Mapping[str, FileState]) -> SnapshotDiff:
    return SnapshotDiff(
        added=sorted(set(after) - set(before)),
        removed=sorted(set(before) - set(after)),
        changed={
            path: (before[path], after[path])
            for path in sorted(set(before) & set(after))
            if before[path] != after[path]
        },
    )


def assert_files_preserved(
    before: Mapping[str, FileState],
    after: Mapping[str, FileState],
    host: str = "",
    allow_added: bool = True,
) -> None:
    """Every file of before is still there with the same content, mode and owner."""
    diff = diff_snapshots(before, after)
    if allow_added:
        diff.added = []
    if diff:
        where = f"{host}: " if host else ""
        raise AssertionError(f"{where}files were lost or altered:\n{diff.describe()}")
