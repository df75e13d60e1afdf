"""The Docker engine on the controller: find it, or install and start it when we may."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence

ENGINE_START_TIMEOUT_S = 90
DOCKERD_LOG = "/var/log/dockerd.log"

# Commands the harness needs, and the Debian package that provides each.
REQUIRED_COMMANDS = {
    "docker": "docker.io",
    "debootstrap": "debootstrap",
    "ssh-keygen": "openssh-client",
    "rsync": "rsync",
}


class EngineUnavailable(Exception):
    """No Docker engine answers, and the harness cannot provide one."""


class CommandFailed(AssertionError):
    """A command the harness ran failed; the message carries its output."""


def run_command(
    argv: Sequence[str],
    *,
    timeout: float = 120,
    check: bool = True,
    input: str | bytes | None = None,
    text: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run argv with a time limit; on failure raise CommandFailed with its output."""
    try:
        result = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=text,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise CommandFailed(f"{' '.join(argv)} did not finish within {timeout} s") from error
    if check and result.returncode != 0:
        raise CommandFailed(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout:\n{tail_lines(result.stdout)}\nstderr:\n{tail_lines(result.stderr)}"
        )
    return result


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the docker CLI; keyword arguments as for run_command."""
    return run_command(["docker", *args], **kwargs)


def engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return run_command(["docker", "info"], timeout=30, check=False).returncode == 0
    except CommandFailed:
        return False


def ensure_engine() -> None:
    """Return when a Docker engine answers and the tools the harness uses are present.

    As root, install what is missing and start dockerd; otherwise, or when that fails,
    raise EngineUnavailable with the reason.
    """
    if engine_answers() and not _missing_commands():
        return
    # pytest-xdist workers arrive together: one installs and starts, the others wait for it.
    with open(os.path.join(tempfile.gettempdir(), "labfleet-test-engine.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        _install_and_start()


def _install_and_start() -> None:
    answers = engine_answers()
    missing = _missing_commands()
    if answers and not missing:
        return
    if os.geteuid() != 0:
        problem = "no Docker engine answers `docker info`" if not answers else ""
        if missing:
            problem = "; ".join(filter(None, [problem, f"missing: {', '.join(missing)}"]))
        raise EngineUnavailable(f"{problem}, and only root can install and start one")
    _install_missing_packages()
    if not engine_answers():
        _start_dockerd()
    missing = _missing_commands()
    if missing:
        raise EngineUnavailable(f"still missing after apt-get install: {', '.join(missing)}")


def _missing_commands() -> list[str]:
    return [name for name in REQUIRED_COMMANDS if shutil.which(name) is None]


def _install_missing_packages() -> None:
    wanted = {**REQUIRED_COMMANDS, "dockerd": "docker.io"}
    packages = sorted({package for name, package in wanted.items() if shutil.which(name) is None})
    # Newer docker.io has the daemon only; the client is in docker-cli, which docker.io
    # merely recommends.
    if shutil.which("docker") is None and _package_exists("docker-cli"):
        packages.append("docker-cli")
    if not packages:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run_command(["apt-get", "update"], timeout=600, env=env)
        run_command(
            ["apt-get", "install", "-y", "--no-install-recommends", *packages],
            timeout=1200,
            env=env,
        )
    except (CommandFailed, FileNotFoundError) as error:
        raise EngineUnavailable(f"could not install {' '.join(packages)}: {error}") from error


def _package_exists(name: str) -> bool:
    if shutil.which("apt-cache") is None:
        return False
    result = run_command(["apt-cache", "show", name], timeout=60, check=False)
    return result.returncode == 0 and bool(result.stdout.strip())


def _start_dockerd() -> None:
    if shutil.which("dockerd") is None:
        raise EngineUnavailable("dockerd is not installed and could not be installed")
    with open(DOCKERD_LOG, "ab") as log:
        subprocess.Popen(
            ["dockerd"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if engine_answers():
            return
        time.sleep(1)
    raise EngineUnavailable(
        f"dockerd did not answer within {ENGINE_START_TIMEOUT_S} s; see {DOCKERD_LOG}:\n"
        + tail_lines(_read_text(DOCKERD_LOG))
    )


def _read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


def tail_lines(text: str | bytes | None, lines: int = 40) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
