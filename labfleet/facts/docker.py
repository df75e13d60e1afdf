"""Facts about Docker Engine: its daemon.json, its API through the socket, AppArmor (labfleet.docker)."""

from __future__ import annotations

import json
import re
import shlex
from typing import TypedDict

from pyinfra.api import FactBase


class DaemonJsonState(TypedDict):
    present: bool
    config: dict | None
    error: str | None


class EngineStatus(TypedDict):
    server: str | None
    compose: str | None


class DaemonJson(FactBase[DaemonJsonState]):
    """Docker's daemon.json, parsed.

    Returns ``{"present": bool, "config": dict | None, "error": str | None}``; ``error``
    says why a file that exists is not a JSON object (``config`` is then None).
    """

    def command(self, path: str = "/etc/docker/daemon.json") -> str:
        quoted = shlex.quote(path)
        return f"if [ -f {quoted} ]; then echo present; cat {quoted}; else echo absent; fi"

    def process(self, output):
        lines = list(output)
        if not lines or lines[0] != "present":
            return {"present": False, "config": None, "error": None}
        return {"present": True, **parse_daemon_json("\n".join(lines[1:]))}


def parse_daemon_json(text: str) -> dict:
    """``{"config": dict, "error": None}`` or ``{"config": None, "error": why}``.

    An empty file counts as ``{}``: dockerd itself starts with one.
    """
    if not text.strip():
        return {"config": {}, "error": None}
    try:
        config = json.loads(text)
    except ValueError as exc:
        return {"config": None, "error": f"invalid JSON: {exc}"}
    if not isinstance(config, dict):
        return {"config": None, "error": f"the top level is a JSON {type(config).__name__}, not an object"}
    return {"config": config, "error": None}


class AppArmorEnabled(FactBase):
    """Whether the kernel enforces AppArmor (dockerd then needs apparmor_parser)."""

    @staticmethod
    def default():
        return False

    def command(self) -> str:
        return "cat /sys/module/apparmor/parameters/enabled 2>/dev/null; true"

    def process(self, output):
        return bool(output) and output[0].strip() == "Y"


DOCKER_SOCKET = "/var/run/docker.sock"


HTTP_MARK = "--labfleet-http"


def socket_curl() -> str:
    """curl on the engine's socket (read when a command is made, so tests can point it elsewhere)."""
    return f"curl --silent --globoff --max-time 30 --unix-socket {shlex.quote(DOCKER_SOCKET)}"


def docker_api(*paths: str) -> str:
    """One curl that asks the engine's API for each path in turn, each answer followed by a
    ``--labfleet-http <status>`` line; nothing when curl or the engine is missing.

    The docker CLI is a Go program that costs the host tens of milliseconds of CPU to start,
    and these facts are read on every run; labfleet installs curl with the engine.
    """
    urls = " ".join(shlex.quote(f"http://docker{path}") for path in paths)
    return (
        f"command -v curl >/dev/null || exit 0; {socket_curl()} --write-out '\\n{HTTP_MARK} %{{http_code}}\\n' {urls}"
    )


def api_answers(output) -> list[tuple[int, str]]:
    """(status, body) for each answer docker_api printed; status 0 where the engine did not answer."""
    answers: list[tuple[int, str]] = []
    body: list[str] = []
    for line in output:
        if line.startswith(HTTP_MARK):
            code = line[len(HTTP_MARK) :].strip()
            answers.append((int(code) if code.isdigit() else 0, "\n".join(body)))
            body = []
        else:
            body.append(line)
    return answers


def api_json(status: int, body: str) -> dict | None:
    """The JSON object of a 200 answer, None for anything else."""
    if status != 200:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class DockerEngineStatus(FactBase[EngineStatus]):
    """The engine and Compose: ``{"server": "26.1.5" | None, "compose": "2.26.1" | None}``.

    ``server`` is the engine's version when it answers on its socket (the ``Server`` header
    of ``/_ping``, which costs the engine nothing, unlike ``/version``); ``compose`` is the
    Compose v2 plugin's version. A plugin installed from a package has that package's
    version (the plugin prints the same), read from dpkg; only a plugin that no package owns
    is run (``version --short``). Compose v1 has no plugin.
    """

    PLUGIN_DIRS = (
        "/usr/local/lib/docker/cli-plugins",
        "/usr/local/libexec/docker/cli-plugins",
        "/usr/lib/docker/cli-plugins",
        "/usr/libexec/docker/cli-plugins",
    )

    @staticmethod
    def default():
        return {"server": None, "compose": None}

    def command(self) -> str:
        plugins = " ".join(f"{directory}/docker-compose" for directory in self.PLUGIN_DIRS)
        return (
            "command -v docker >/dev/null || exit 0; "
            f"command -v curl >/dev/null && {socket_curl()} --output /dev/null --dump-header - http://docker/_ping; "
            f'c=; for p in {plugins}; do [ -x "$p" ] && {{ c=$p; break; }}; done; '
            'if [ -z "$c" ]; then echo "compose $(docker compose version --short 2>/dev/null)"; exit 0; fi; '
            'set -- $(grep -lx -- "$c" /var/lib/dpkg/info/docker*.list 2>/dev/null); '
            'if [ -n "$1" ]; then p=${1##*/}; echo "package $(dpkg-query -W -f \'${Version}\' "${p%.list}")"; '
            'else echo "compose $("$c" version --short 2>/dev/null)"; fi'
        )

    def process(self, output):
        status = self.default()
        for line in output:
            kind, _, value = line.strip().partition(" ")
            if kind.lower() == "server:" and value.startswith("Docker/"):
                status["server"] = value.removeprefix("Docker/").split()[0]
            elif kind == "compose" and value.strip():
                status["compose"] = value.strip().lstrip("v")
            elif kind == "package":
                # Epoch and Debian revision off: 2.26.1-4 -> 2.26.1, 2.27.0+ds1-0ubuntu1 -> 2.27.0
                upstream = re.match(r"(?:\d+:)?(\d+(?:\.\d+)*)", value.strip())
                status["compose"] = upstream.group(1) if upstream else None
        return status
