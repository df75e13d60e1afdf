"""Facts about each jupyter user's persistent HOME (labfleet.jupyter writes it, labfleet.report sizes it)."""

from __future__ import annotations

import shlex
from typing import TypedDict

from pyinfra.api import FactBase

# du walks every file; a big HOME (model caches) must not hold the status of the whole fleet up.
SIZE_SECONDS = 5


class HomeSizeState(TypedDict):
    bytes: int | None  # None: no such directory, or not counted in time
    counted: bool  # False when du ran out of time (the size is then unknown)


class HomeSize(FactBase[HomeSizeState]):
    """The disk space a HOME uses (``du -skx``), given up after SIZE_SECONDS seconds.

    + path: the home directory on the host

    Returns ``{"bytes": int | None, "counted": bool}``.
    """

    @staticmethod
    def default() -> HomeSizeState:
        return HomeSizeState(bytes=None, counted=True)

    def command(self, path: str) -> str:
        quoted = shlex.quote(path)
        return f'[ -d {quoted} ] || exit 0; timeout {SIZE_SECONDS} du -skx -- {quoted} 2>/dev/null; echo "du-exit $?"'

    def process(self, output) -> HomeSizeState:
        return parse_home_size(output)


def parse_home_size(output) -> HomeSizeState:
    size, code = None, None
    for line in output:
        if line.startswith("du-exit "):
            code = line.split()[1]
        elif line.split() and line.split()[0].isdigit():
            size = int(line.split()[0]) * 1024
    if code == "124":
        return HomeSizeState(bytes=None, counted=False)
    return HomeSizeState(bytes=size, counted=True)


class FileNames(FactBase[list[str]]):
    """The names of the plain files directly in a directory (none when it is missing).

    + path: the directory
    """

    @staticmethod
    def default() -> list[str]:
        return []

    def command(self, path: str) -> str:
        return f"find {shlex.quote(path)} -maxdepth 1 -type f -printf '%f\\n' 2>/dev/null || true"

    def process(self, output) -> list[str]:
        return sorted(line for line in output if line)
