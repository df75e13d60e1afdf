"""Test hosts: containers that boot systemd and sshd, reachable only on 127.0.0.1.

A Fleet belongs to one pytest session. It names its hosts `lf-<session>-<n>`, labels them
`labfleet.test=1` and `labfleet.session=<session>`, and removes them with their volumes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .engine import CommandFailed, docker, run_command, tail_lines
from .images import engine_host_image, host_image

MAX_HOSTS_PER_CALL = 6
BOOT_TIMEOUT_S = 90
BANNER_TIMEOUT_S = 30
SSH_USER = "lab"
APP_PORT = 8888

TEST_LABEL = "labfleet.test"
SESSION_LABEL = "labfleet.session"
OWNER_LABEL = "labfleet.owner"  # "<pid>-<start time>" of the pytest process

# systemd and a nested Docker engine without --privileged, which runc refuses here.
SYSTEMD_RUN_FLAGS = (
    "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
    "--security-opt", "seccomp=unconfined",
    "--security-opt", "apparmor=unconfined",
    "--security-opt", "systempaths=unconfined",
    "--cgroupns=private",
    "--device-cgroup-rule=a *:* rwm",
    "--tmpfs", "/run", "--tmpfs", "/run/lock",
)  # fmt: skip


@dataclass(frozen=True)
class TestHost:
    """One running test host, as pyinfra and the tests reach it."""

    __test__ = False  # not a pytest test class

    name: str
    container: str
    ssh_port: int
    app_port: int
    distro: str
    ssh_user: str = SSH_USER
    ssh_key: str = ""

    def ssh_command(self) -> str:
        return (
            f"ssh -i {self.ssh_key} -p {self.ssh_port} -o StrictHostKeyChecking=no "
            f"-o UserKnownHostsFile=/dev/null {self.ssh_user}@127.0.0.1"
        )


class HostBootFailed(AssertionError):
    """A test host did not reach a running systemd and an answering sshd."""


def host_exec(
    host: TestHost,
    cmd: str,
    check: bool = True,
    timeout: float = 300,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run cmd with `sh -c` as root inside host; with check, fail naming the host."""
    interactive = ["-i"] if input is not None else []
    result = docker(
        "exec", *interactive, host.container, "sh", "-c", cmd,
        check=False, timeout=timeout, input=input,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise CommandFailed(
            f"{host.name}: `{cmd}` exited {result.returncode}\n"
            f"stdout:\n{tail_lines(result.stdout)}\nstderr:\n{tail_lines(result.stderr)}"
        )
    return result


def generate_keypair(directory: Path) -> Path:
    """An ed25519 key pair without passphrase in directory; returns the private key path."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "id_ed25519"
    if not key.exists():
        run_command(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "labfleet-test", "-f", str(key)],
            timeout=60,
        )
    return key


class Fleet:
    """The test hosts of one pytest session."""

    def __init__(self, key: Path, session: str | None = None):
        self.session = session or uuid.uuid4().hex[:6]
        self.key = key
        self.public_key = Path(f"{key}.pub").read_text()
        self.hosts: list[TestHost] = []
        self._counter = 0
        self._lock = threading.Lock()

    def start_hosts(self, n: int, distro: str = "trixie", engine: bool = False) -> list[TestHost]:
        """Start n hosts in parallel and return them once each answers SSH.

        With engine, the hosts have the distribution's Docker Engine installed already.
        """
        if not 1 <= n <= MAX_HOSTS_PER_CALL:
            raise ValueError(f"start between 1 and {MAX_HOSTS_PER_CALL} hosts, not {n}")
        image = engine_host_image(distro) if engine else host_image(distro)
        names = [self._next_name() for _ in range(n)]
        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(self._start_one, name, image, distro) for name in names]
            started, errors = [], []
            for future in futures:
                try:
                    started.append(future.result())
                except Exception as error:
                    errors.append(error)
        if errors:
            raise HostBootFailed("\n\n".join(str(error) for error in errors))
        return started

    def remove(self, hosts: list[TestHost]) -> None:
        remove_containers([host.container for host in hosts])
        with self._lock:
            self.hosts = [host for host in self.hosts if host not in hosts]

    def remove_all(self) -> None:
        """Remove every container of this session, including half-started ones."""
        remove_containers(_containers_with_label(f"{SESSION_LABEL}={self.session}"))
        self.hosts = []

    def _next_name(self) -> str:
        with self._lock:
            self._counter += 1
            return f"lf-{self.session}-{self._counter}"

    def _start_one(self, name: str, image: str, distro: str) -> TestHost:
        docker(
            "run", "--detach", "--name", name, "--hostname", name,
            "--label", f"{TEST_LABEL}=1",
            "--label", f"{SESSION_LABEL}={self.session}",
            "--label", f"{OWNER_LABEL}={process_identity(os.getpid())}",
            *SYSTEMD_RUN_FLAGS,
            # The engine labfleet installs needs a real file system for overlay2.
            "--volume", "/var/lib/docker",
            # Datasets, workspaces and homes on the machine's file system, as on a lab PC, not on
            # the container's overlay (which costs 3-4x the kernel time per file created).
            "--volume", "/srv",
            "--publish", "127.0.0.1::22",
            "--publish", f"127.0.0.1::{APP_PORT}",
            image,
            timeout=120,
        )  # fmt: skip
        host = TestHost(
            name=name,
            container=name,
            ssh_port=_published_port(name, 22),
            app_port=_published_port(name, APP_PORT),
            distro=distro,
            ssh_key=str(self.key),
        )
        with self._lock:
            self.hosts.append(host)
        _wait_for_systemd(host)
        _install_public_key(host, self.public_key)
        _wait_for_ssh_banner(host)
        return host


def remove_containers(containers: list[str]) -> None:
    if containers:
        docker("rm", "--force", "--volumes", *containers, check=False, timeout=300)


def remove_stale_hosts(current_session: str) -> list[str]:
    """Remove test hosts left by earlier interrupted runs; returns their names.

    Hosts of another session whose pytest process is still alive belong to a concurrent
    run and are left alone.
    """
    stale = []
    for container in _containers_with_label(f"{TEST_LABEL}=1"):
        labels = _labels(container)
        if labels.get(SESSION_LABEL) == current_session:
            continue
        if owner_alive(labels.get(OWNER_LABEL, "")):
            continue
        stale.append(container)
    remove_containers(stale)
    return stale


def _containers_with_label(label: str) -> list[str]:
    listed = docker("ps", "--all", "--filter", f"label={label}", "--format", "{{.Names}}")
    return listed.stdout.split()


def _labels(container: str) -> dict[str, str]:
    inspected = docker("inspect", "--format", "{{json .Config.Labels}}", container, check=False, timeout=60)
    try:
        return json.loads(inspected.stdout) or {}
    except ValueError:
        return {}


def process_identity(pid: int) -> str:
    """The pid and start time of a process; unlike a bare pid, it never names a later process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # Field 22 is the start time; the command name before it may contain spaces.
    return f"{pid}-{stat.rpartition(')')[2].split()[19]}"


def owner_alive(owner: str) -> bool:
    """Whether the process named by a process_identity() value still runs."""
    pid = owner.partition("-")[0]
    return bool(owner) and pid.isdigit() and process_identity(int(pid)) == owner


def _published_port(container: str, port: int) -> int:
    listed = docker("port", container, f"{port}/tcp", timeout=60)
    for line in listed.stdout.splitlines():
        address, _, number = line.strip().rpartition(":")
        if address == "127.0.0.1" and number.isdigit():
            return int(number)
    raise HostBootFailed(f"{container}: port {port} is not published on 127.0.0.1: {listed.stdout}")


def _wait_for_systemd(host: TestHost) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    state = ""
    while time.monotonic() < deadline:
        if not _is_running(host.container):
            raise HostBootFailed(f"{host.name}: container exited\n{_boot_diagnostics(host)}")
        probe = docker("exec", host.container, "systemctl", "is-system-running", check=False, timeout=30)
        state = probe.stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.5)
    raise HostBootFailed(f"{host.name}: systemd still '{state}' after {BOOT_TIMEOUT_S} s\n{_boot_diagnostics(host)}")


def _install_public_key(host: TestHost, public_key: str) -> None:
    host_exec(
        host,
        f"install -d -m 0700 -o {SSH_USER} -g {SSH_USER} /home/{SSH_USER}/.ssh"
        f" && cat > /home/{SSH_USER}/.ssh/authorized_keys"
        f" && chown {SSH_USER}:{SSH_USER} /home/{SSH_USER}/.ssh/authorized_keys"
        f" && chmod 0600 /home/{SSH_USER}/.ssh/authorized_keys",
        input=public_key,
        timeout=60,
    )


def _wait_for_ssh_banner(host: TestHost) -> None:
    # Docker's port proxy accepts connections before sshd listens; only the banner proves it.
    deadline = time.monotonic() + BANNER_TIMEOUT_S
    last = b""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", host.ssh_port), timeout=3) as conn:
                conn.settimeout(3)
                last = conn.recv(64)
                if last.startswith(b"SSH-2.0"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise HostBootFailed(
        f"{host.name}: no SSH-2.0 banner on 127.0.0.1:{host.ssh_port} after "
        f"{BANNER_TIMEOUT_S} s (last read {last!r})\n{_boot_diagnostics(host)}"
    )


def _is_running(container: str) -> bool:
    state = docker("inspect", "--format", "{{.State.Running}}", container, check=False, timeout=60)
    return state.stdout.strip() == "true"


def _boot_diagnostics(host: TestHost) -> str:
    logs = docker("logs", "--tail", "30", host.container, check=False, timeout=60)
    failed = docker("exec", host.container, "systemctl", "--failed", "--no-legend", check=False, timeout=30)
    jobs = docker("exec", host.container, "systemctl", "list-jobs", check=False, timeout=30)
    return (
        f"container log:\n{tail_lines(logs.stdout + logs.stderr, 30)}\n"
        f"failed units:\n{failed.stdout.strip()}\npending jobs:\n{tail_lines(jobs.stdout, 15)}"
    )
