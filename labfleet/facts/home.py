"""Facts about each jupyter user's persistent HOME (labfleet.jupyter writes it, labfleet.report sizes it)."""

from __future__ import annotations

import shlex
from typing import TypedDict

from pyinfra.api import FactBase

from labfleet import compose
from labfleet.facts.docker import api_answers, api_json, docker_api

# What the engine reports as StartedAt for a container that never ran.
NEVER_STARTED = "0001-01-01T00:00:00"
# du walks every file; a big HOME (model caches) must not hold the status of the whole fleet up.
SIZE_SECONDS = 5


class ContainerHomeState(TypedDict):
    started: bool  # the project's container exists and has run (so its entrypoint made HOME)
    mounted: bool  # its HOME is a mount (home_dir), not the container's own layer


class ContainerHome(FactBase[ContainerHomeState]):
    """Whether a project's container holds its HOME in its own layer, which a recreate would lose.

    + project: the compose project
    + home: HOME inside the container (/home/<user>)

    Returns ``{"started": bool, "mounted": bool}``; both False without a container. A stopped
    container counts too: its layer is lost just the same.
    """

    def requires_command(self, *args, **kwargs) -> str:
        return "docker"

    @staticmethod
    def default() -> ContainerHomeState:
        return ContainerHomeState(started=False, mounted=False)

    def command(self, project: str, home: str) -> str:
        self.project, self.home = project, home
        return docker_api(f"/containers/{compose.container_name(project)}/json")

    def process(self, output) -> ContainerHomeState:
        return parse_container_home(output, getattr(self, "project", None), getattr(self, "home", ""))


def parse_container_home(output, project: str | None, home: str) -> ContainerHomeState:
    answers = api_answers(output)
    found = api_json(*answers[0]) if answers else None
    if not found:
        return ContainerHome.default()
    labels = (found.get("Config") or {}).get("Labels") or {}
    if project is not None and labels.get("com.docker.compose.project") != project:
        return ContainerHome.default()
    mounts = found.get("Mounts") or []
    started_at = (found.get("State") or {}).get("StartedAt") or NEVER_STARTED
    return ContainerHomeState(
        started=not started_at.startswith(NEVER_STARTED),
        mounted=any(mount.get("Destination") == home for mount in mounts),
    )


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
