"""Facts about apt sources and repository keys (labfleet.apt)."""

from __future__ import annotations

import shlex
from typing import TypedDict

from pyinfra.api import FactBase


class AptFileEntries(TypedDict):
    path: str
    entries: int
    matching: int


class AptFiles(TypedDict):
    files: list[AptFileEntries]
    present: list[str]
    sha256: dict[str, str]


class AptSourceEntries(FactBase[AptFiles]):
    """apt source files that hold entries for any of the given repository URLs, and which of some paths exist.

    + markers: URL fragments that identify the repository
    + paths: other files to look for (the repository's keyrings, pin files)

    Returns ``{"files": [{"path", "entries", "matching"}], "present": [path, ...], "sha256": {path: hex}}``:
    ``entries`` counts all entries of the file (``deb`` lines, or ``URIs:`` fields of
    deb822 stanzas) and ``matching`` those that name one of the markers, so a caller can
    tell a file that belongs to the repository from one it merely shares.
    """

    @staticmethod
    def default():
        return {"files": [], "present": [], "sha256": {}}

    def command(self, markers: tuple[str, ...], paths: tuple[str, ...] = ()) -> str:
        fixed = " ".join(f"-e {shlex.quote(marker)}" for marker in markers)
        others = " ".join(shlex.quote(path) for path in paths)
        return (
            "for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do "
            '[ -f "$f" ] || continue; '
            "case $f in *.sources) e='^[[:space:]]*URIs:';; *) e='^[[:space:]]*deb(-src)?[[:space:]]';; esac; "
            'n=$(grep -Ec "$e" "$f"); '
            f'm=$(grep -E "$e" "$f" | grep -Fc {fixed}); '
            '[ "$m" -gt 0 ] && echo "file $n $m $f"; '
            "done; "
            + (
                f'for p in {others}; do [ -f "$p" ] && echo "present $(sha256sum < "$p" | cut -d" " -f1) $p"; done; '
                if others
                else ""
            )
            + "true"
        )

    def process(self, output):
        found = self.default()
        for line in output:
            kind, _, rest = line.partition(" ")
            if kind == "file":
                entries, matching, path = rest.split(" ", 2)
                found["files"].append({"path": path, "entries": int(entries), "matching": int(matching)})
            elif kind == "present":
                digest, _, path = rest.partition(" ")
                found["present"].append(path)
                found["sha256"][path] = digest
        return found


EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class KeyringDigests(FactBase):
    """sha256 of a repository key as served at url, and of the copy at path.

    Returns ``{"remote": hex | None, "local": hex | None}``; remote is None when the
    host could not download the key (no curl/wget yet, or the URL does not answer).
    """

    @staticmethod
    def default():
        return {"remote": None, "local": None}

    def command(self, url: str, path: str) -> str:
        url, path = shlex.quote(url), shlex.quote(path)
        return (
            f"r=$({{ curl -fsSL --max-time 30 {url} 2>/dev/null || wget -q -T 30 -O- {url} 2>/dev/null; }} "
            '| sha256sum | cut -d" " -f1); '
            'echo "remote $r"; '
            f'[ -f {path} ] && echo "local $(sha256sum < {path} | cut -d" " -f1)"; true'
        )

    def process(self, output):
        digests = {"remote": None, "local": None}
        for line in output:
            kind, _, value = line.partition(" ")
            if kind in digests and value and value != EMPTY_SHA256:
                digests[kind] = value
        return digests
