"""The walk of a local: dataset's tree that its digest hashes, with nothing but the standard library.

It runs in planning and in the child that lists a source while pyinfra connects
(labfleet.dataset_listing): that child starts a Python of its own, and importing pyinfra
there would cost more than the walk it saves, so this module (and its ``main``) imports
only the standard library and labfleet.dataset_changes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

from labfleet import dataset_changes


def tree_digest(root: str) -> str:
    """One sha256 over what rsync would send from root: every directory, file and symlink below it.

    Entries are sorted by their path (as bytes), so the order never depends on the file
    system. A file contributes its size, mtime (to the nanosecond) and mode; a directory its
    mode only (the syncs leave directory times alone, and a file added or removed shows as
    its own entry); a symlink its target. Sockets, FIFOs and devices are left out, as rsync
    leaves them out without ``--specials`` and ``--devices``. An unreadable directory
    raises OSError: the caller then syncs, and rsync says what it cannot read.

    GNU find lists the tree (about four times faster than a walk in Python: 0.5 s for
    200,000 files, and the other hosts' planning goes on meanwhile); where it is missing or
    fails, Python walks it, and both give the same digest.
    """
    return "sha256:" + hashlib.sha256(tree_listing(root)).hexdigest()


def tree_listing(root: str) -> bytes:
    """What tree_digest hashes: each entry's path and what the digest takes of it, NUL-ended, sorted."""
    entries = _found(root)
    if entries is None:
        entries = []
        _walk(os.fsencode(root), b"", entries)
    # Each entry is one bytes object, path NUL what NUL: sorted as bytes, that is by path (NUL
    # sorts first and no path holds one), without a tuple or a format per entry (half the time).
    entries.sort()
    return b"".join(entries)


# What find prints per entry: the path, NUL, what the digest takes of it, NUL (%T@ is
# seconds with ten decimals: nanoseconds and a 0).
FIND_ENTRIES = (
    "(", "-type", "d", "-printf", "%P\\0d %m\\0", ")", "-o",
    "(", "-type", "f", "-printf", "%P\\0f %s %T@ %m\\0", ")", "-o",
    "(", "-type", "l", "-printf", "%P\\0l %l\\0", ")",
)  # fmt: skip


def _found(root: str) -> list[bytes] | None:
    """The entries below root as find lists them; None when find is missing or fails (not GNU, unreadable)."""
    try:
        listed = subprocess.run(
            ["find", root, "-mindepth", "1", *FIND_ENTRIES], capture_output=True, check=False, timeout=3600
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    entries = dataset_changes.ENTRY.findall(listed.stdout)
    if listed.returncode != 0 or sum(map(len, entries)) != len(listed.stdout):
        return None
    return entries


def _walk(directory: bytes, relative: bytes, entries: list[bytes]) -> None:
    with os.scandir(directory) as listing:
        found = list(listing)
    for entry in found:
        path = relative + entry.name
        info = entry.stat(follow_symlinks=False)
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISLNK(info.st_mode):
            entries.append(b"%s\0l %s\0" % (path, os.readlink(entry.path)))
        elif stat.S_ISREG(info.st_mode):
            seconds, nanoseconds = divmod(info.st_mtime_ns, 10**9)
            entries.append(b"%s\0f %d %d.%09d0 %o\0" % (path, info.st_size, seconds, nanoseconds, mode))
        elif stat.S_ISDIR(info.st_mode):
            entries.append(b"%s\0d %o\0" % (path, mode))
            _walk(entry.path, path + b"/", entries)


def main(src: str) -> int:
    """List src, keep its listing for the next run's changed paths, print its digest; 1: unreadable."""
    try:
        listing = tree_listing(src)
    except OSError:
        return 1
    digest = "sha256:" + hashlib.sha256(listing).hexdigest()
    dataset_changes.remember(src, digest, listing)
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
