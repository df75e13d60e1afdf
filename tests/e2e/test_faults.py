"""Faults labfleet survives: an unreachable host, a controller killed mid-run, a stopped
engine, a killed container, and a disk too small for the next image.

Every wait is a bounded poll; nothing asserts on time.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from labfleet import archives, image

from .harness.certs import self_signed_ca
from .harness.engine import docker
from .harness.hosts import TestHost, host_exec
from .harness.runner import (
    REPO_ROOT,
    _pyinfra_command,
    assert_converged,
    controller_ca_certificates,
    write_inventory,
)
from .test_status import run_status

FIND_CONTAINER = "docker ps -q --filter label=com.docker.compose.project=labfleet-lab"
FIND_CONTAINER_ID = f"$({FIND_CONTAINER})"
# Polls that must catch a short-lived process (a kill trigger) run this often.
POLL_S = 0.2
NEXT_LAYER_MIB = 256  # random, so no codec shrinks it: a copy of some seconds over loopback SSH


def wait_for(what: str, probe, timeout: float = 300, interval: float = 1.0):
    """Call probe until it returns something truthy; fail naming what after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"gave up waiting for {what} after {timeout} s")


def wait_for_process(host: TestHost, pattern: str, controller: Controller, what: str, timeout: float = 600) -> None:
    """Wait until a process matching pattern (pgrep -f) runs on host, while the controller runs.

    Write the pattern so that it does not match itself ("[d]ocker load"): the polling shell's
    command line holds it.
    """
    _wait_on_host(host, f"pgrep -f {shlex.quote(pattern)} >/dev/null", controller, what, timeout)


def wait_for_file(host: TestHost, glob: str, controller: Controller, what: str, timeout: float = 600) -> None:
    """Wait until a file matching glob exists on host, while the controller runs."""
    _wait_on_host(host, f"ls {glob} >/dev/null 2>&1", controller, what, timeout)


def _wait_on_host(host: TestHost, check: str, controller: Controller, what: str, timeout: float) -> None:
    """The host polls check itself, POLL_S apart, in rounds of about 10 s, so that a short-lived
    state is caught without a `docker exec` per probe."""
    deadline = time.monotonic() + timeout
    probe = f"for i in $(seq 50); do {check} && exit 0; sleep {POLL_S}; done; exit 1"
    while time.monotonic() < deadline:
        assert controller.running(), f"the deploy ended before {what}:\n{controller.output()[-3000:]}"
        if host_exec(host, probe, check=False, timeout=60).returncode == 0:
            return
    raise AssertionError(f"gave up waiting for {what} after {timeout} s")


def _closed_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _container_state(host: TestHost) -> dict | None:
    """The lab container's image, state, health and restart count, or None without one."""
    found = host_exec(
        host,
        "docker ps -aq --filter label=com.docker.compose.project=labfleet-lab | head -n 1 | xargs -r docker inspect "
        "--format '{{json .Image}} {{json .State.Status}} {{json .State.Health.Status}} {{.RestartCount}}'",
        check=False,
    ).stdout.split()
    if len(found) != 4:
        return None
    image_id, status, health, restarts = found
    return {"image": json.loads(image_id), "status": json.loads(status), "health": json.loads(health),
            "restarts": int(restarts)}  # fmt: skip


def _healthy(host: TestHost) -> dict | None:
    state = _container_state(host)
    return state if state and state["status"] == "running" and state["health"] == "healthy" else None


def _tag(host: TestHost) -> str:
    return host_exec(host, "grep LABFLEET_IMAGE /opt/labfleet/lab/.env | cut -d\\' -f2").stdout.strip()


class Controller:
    """A pyinfra run in the background, to be killed like a controller that loses power."""

    def __init__(self, hosts, data: dict, workdir: Path):
        inventory = write_inventory(workdir, hosts, data)
        self.path = workdir / "pyinfra.log"
        self.log = self.path.open("w")
        self.process = subprocess.Popen(
            [*_pyinfra_command(), "-y", str(inventory), "deploy.py"],
            cwd=REPO_ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.wait(timeout=60)


def kill_controller_when(hosts, data: dict, host: TestHost, pattern: str, what: str) -> None:
    """Start a deploy; SIGKILL it as soon as a process matching pattern runs on host."""
    with tempfile.TemporaryDirectory(prefix="labfleet-fault-") as workdir:
        controller = Controller(hosts, data, Path(workdir))
        try:
            wait_for_process(host, pattern, controller, what)
        finally:
            if controller.running():
                controller.kill()


# --- An unreachable host ------------------------------------------------------------------------


def test_an_unreachable_host_fails_alone_and_is_named(make_hosts, pyinfra_run, lab_data):
    (alive,) = make_hosts(1, engine=True)
    gone = TestHost(
        name=f"{alive.name}-gone",
        container="none",
        ssh_port=_closed_loopback_port(),
        app_port=0,
        distro="trixie",
        ssh_key=alive.ssh_key,
    )
    result = pyinfra_run([alive, gone], data=lab_data, expect_fail=True)
    output = result.stdout + result.stderr
    assert result.rc != 0
    assert "Traceback" not in output
    assert f"[{gone.name}]" in output and "Could not connect" in output, result.stderr_tail()
    assert not [error for error in result.errors() if error[0] == alive.name], result.errors()
    assert _healthy(alive), f"{alive.name} did not converge"

    # The status names it too.
    status_run, status = run_status([alive, gone], lab_data, as_json=True, expect_fail=True)
    assert status_run.rc != 0
    assert status["drift"] == {gone.name: ["unreachable"]}
    assert {"host": gone.name, "unreachable": True, "drift": ["unreachable"], "ok": False} in status["hosts"]


# --- The controller killed mid-run --------------------------------------------------------------


def test_a_controller_killed_during_the_docker_install_needs_no_manual_repair(make_hosts, pyinfra_run, lab_data):
    """The deploy is killed while dpkg installs Docker; the host then loses dpkg too, as a
    hangup of the session would do, so the package database is left half-configured."""
    (host,) = make_hosts(1)
    kill_controller_when(
        [host], lab_data, host, "^/usr/bin/dpk[g] .*--(unpack|configure)", "dpkg installing Docker Engine"
    )
    host_exec(host, "pkill -KILL -x apt-get; pkill -KILL -x dpkg; true")

    assert_converged(pyinfra_run([host], data=lab_data))
    assert host_exec(host, "dpkg --audit").stdout.strip() == "", "dpkg still has half-installed packages"
    assert host_exec(host, "systemctl is-active docker").stdout.strip() == "active"
    assert _healthy(host)


def test_a_controller_killed_during_the_image_load_needs_no_manual_repair(make_hosts, pyinfra_run, lab_data):
    (host,) = make_hosts(1, engine=True)
    kill_controller_when([host], lab_data, host, "[d]ocker load", "docker load of the shipped image")

    assert_converged(pyinfra_run([host], data=lab_data))
    tag = _tag(host)
    state = _healthy(host)
    assert (
        state and state["image"] == host_exec(host, f"docker image inspect --format '{{{{.Id}}}}' {tag}").stdout.strip()
    )
    assert host_exec(host, "ls /var/tmp/labfleet-* 2>/dev/null; true").stdout.strip() == "", "archive left behind"


# --- A deployed host, its engine and its container ----------------------------------------------


@pytest.fixture(scope="module")
def deployed(fleet, lab_data):
    hosts = fleet.start_hosts(1, engine=True)
    try:
        from .harness.runner import run_pyinfra

        assert_converged(run_pyinfra(hosts, data=lab_data))
        yield hosts[0]
    finally:
        if os.environ.get("LABFLEET_KEEP_HOSTS") != "1":
            fleet.remove(hosts)


def test_a_dockerd_stopped_by_hand_is_started_by_the_next_run(deployed, pyinfra_run, lab_data):
    host = deployed
    # The socket too, or the first docker command would start the engine again by itself.
    host_exec(host, "systemctl stop docker.socket docker.service")
    assert host_exec(host, "systemctl is-active docker", check=False).stdout.strip() != "active"

    result = pyinfra_run([host], data=lab_data)
    assert_converged(result)
    assert result.status(host, "Start and enable dockerd") == "success"
    assert host_exec(host, "systemctl is-active docker").stdout.strip() == "active"
    assert wait_for("the container healthy again", lambda: _healthy(host), timeout=180)


def test_a_killed_container_is_restarted_by_its_policy_and_status_shows_it(deployed, lab_data):
    host = deployed
    before = wait_for("a healthy container", lambda: _healthy(host), timeout=180)
    # Killed as the OOM killer or a crash would: its init process, from the host. (`docker
    # kill` and `docker stop` are requests to Docker, which then keeps the container down,
    # by design, until it is started again; see docker-kill(1).)
    host_exec(host, f"kill -KILL $(docker inspect --format '{{{{.State.Pid}}}}' {FIND_CONTAINER_ID})")
    after = wait_for(
        "the killed container to be restarted and healthy",
        lambda: (state := _healthy(host)) and state["restarts"] > before["restarts"] and state,
        timeout=240,
    )
    assert after["image"] == before["image"]

    result, status = run_status([host], lab_data, as_json=True)
    assert result.rc == 0 and status["ok"], status["drift"]
    (jupyter,) = status["hosts"][0]["users"]
    assert jupyter["health"] == "healthy" and jupyter["restarts"] == after["restarts"]


# --- A disk too small for the next image --------------------------------------------------------


def _df(host: TestHost, field: str) -> int:
    return int(host_exec(host, f"df -B1 --output={field} /var/lib/docker | tail -n 1").stdout.strip())


@pytest.fixture
def next_image(lab_data, tmp_path):
    """Settings whose image tag differs from lab_data's (one more CA), and that tag built on the
    controller as a child of the current image with one new layer of NEXT_LAYER_MIB random bytes:
    a distinct image id, made in seconds, whose copy takes long enough to be caught in flight.
    (A label-only child would ship no layer at all: a host holding the current image has them all.)"""
    cas = [*controller_ca_certificates(), self_signed_ca(tmp_path, "labfleet next image")]
    data = {**lab_data, "extra_ca_certificates": cas}
    current = image.image_tag(image.controller_settings(**{**lab_data, "extra_ca_certificates": cas[:-1]}))
    tag = image.image_tag(image.controller_settings(**data))
    assert tag != current
    recipe = (
        f"FROM {current}\nLABEL org.labfleet.test.next=1\n"
        f"RUN head -c {NEXT_LAYER_MIB}M /dev/urandom >/opt/labfleet-test-next.bin\n"
    )
    docker("build", "-q", "-t", tag, "-", input=recipe,
           env={**os.environ, "DOCKER_BUILDKIT": "0"}, timeout=300)  # fmt: skip
    image_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    yield data, tag, image_id
    docker("rmi", tag, check=False, timeout=120)
    whole = archives.archive_path(image_id)
    for archive in whole.parent.glob(whole.name.split(".")[0] + "*"):
        archive.unlink(missing_ok=True)


def test_a_disk_too_small_for_the_next_image_keeps_the_running_one(make_hosts, pyinfra_run, lab_data, next_image):
    (host,) = make_hosts(1, engine=True)
    # A small file system of its own under /var/lib/docker, so that "full" costs no real disk.
    host_exec(
        host,
        "systemctl stop docker.socket docker.service && "
        "mount -t tmpfs -o size=3g labfleet-test /var/lib/docker && systemctl start docker.socket docker.service",
    )
    assert_converged(pyinfra_run([host], data=lab_data))
    running = _healthy(host)
    assert running
    data, next_tag, next_id = next_image

    # 1. Too little room from the start: refused before anything is copied, with the sizes.
    host_exec(host, f"mount -o remount,size={_df(host, 'used') + 200 * 2**20} /var/lib/docker")
    refused = pyinfra_run([host], data=data, expect_fail=True)
    output = refused.stdout + refused.stderr
    line = next((line for line in output.splitlines() if f"host {host.name}: " in line and "free under" in line), "")
    assert f"free under /var/lib/docker, but {next_tag} needs about" in line and "GiB" in line, output[-3000:]
    copies = [line for line in output.splitlines() if "Starting operation" in line and f"Copy {next_tag}" in line]
    assert not copies, "the archive was copied anyway"
    assert host_exec(host, "ls /var/tmp/labfleet-* 2>/dev/null; true").stdout.strip() == ""
    assert _healthy(host)["image"] == running["image"]

    # 2. Room enough for the check, but the disk fills while the new layer is on its way: the
    # load fails, the tag does not move, the archive goes, and the old container keeps running.
    # The disk is filled once the copy has begun (the archive appears in /var/tmp), so the load
    # that follows it always meets a full disk, however fast it would have been.
    host_exec(host, "mount -o remount,size=3g /var/lib/docker")
    with tempfile.TemporaryDirectory(prefix="labfleet-fault-") as workdir:
        controller = Controller([host], data, Path(workdir))
        try:
            wait_for_file(host, "/var/tmp/labfleet-*", controller, "the copy of the next image")
            host_exec(host, "fallocate -l $(( $(df -B1 --output=avail /var/lib/docker | tail -n 1) - 4096 )) "
                            "/var/lib/docker/labfleet-test-filler || true")  # fmt: skip
            controller.wait(timeout=600)
        finally:
            if controller.running():
                controller.kill()
        log = controller.output()
    assert controller.process.returncode != 0, f"the load did not fail on a full disk:\n{log[-3000:]}"
    assert f"labfleet: loading {next_tag} did not give image {next_id}" in log, log[-3000:]
    assert host_exec(host, f"docker image inspect {next_tag}", check=False).returncode != 0, "half-loaded tag"
    assert host_exec(host, "ls /var/tmp/labfleet-* 2>/dev/null; true").stdout.strip() == ""
    state = _healthy(host)
    assert state and state["image"] == running["image"], "the old container stopped or changed image"

    # Room again: the next run converges onto the new image with no manual repair.
    host_exec(host, "rm -f /var/lib/docker/labfleet-test-filler")
    assert_converged(pyinfra_run([host], data=data))
    state = _healthy(host)
    assert state and state["image"] == next_id
