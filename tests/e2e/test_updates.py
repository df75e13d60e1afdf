"""Updates that wait for work to finish, on a real host with a real Jupyter server.

One host serves every step (deploys on a converged host are cheap, the first one is not):
a kernel kept busy through its websocket defers a deploy that changes the container's
settings; the host's own timer applies the update once the kernel is interrupted and the
short idle window has passed; `jupyter_update=now` recreates at once despite a busy kernel;
and a GPU compute process of the container, listed by a STAND-IN nvidia-smi (these machines
have no GPU; the stand-in reports a real process of the container, whose cgroup the check
maps to it), defers an update too.
"""

from __future__ import annotations

import json
import shlex

import pytest

from labfleet import updates

from .harness.hosts import TestHost, host_exec
from .harness.runner import Result, assert_converged, assert_no_changes, run_pyinfra
from .harness.snapshots import checksum_snapshot
from .probes import health, jupyter_api, run_cell
from .test_status import run_status

CONTAINER = "labfleet-lab-jupyterlab-1"
TIMER = "labfleet-update-lab.timer"
IDLE = "15s"
BRING_UP = "Bring up JupyterLab of lab"
DEFERRED = "JupyterLab of lab keeps running its old container: "

STANDIN_NVIDIA_SMI = """#!/bin/sh
# STAND-IN nvidia-smi written by tests/e2e/test_updates.py: these machines have no GPU. It lists
# one real process of the JupyterLab container as a GPU compute app, and knows nothing else.
case "$*" in *--query-compute-apps*) echo "{pid}, python3" ;; esac
"""


def _busy_kernel(host: TestHost) -> str:
    """A kernel busy with a loop that runs on without a client."""
    return run_cell(host, CONTAINER, "import time\nwhile True:\n    time.sleep(0.2)", until="busy")


def _settings_api(method: str, body: str | None = None) -> str:
    """A curl on the host to JupyterLab's settings API for the theme (a user setting kept in HOME)."""
    send = f"-H 'Content-Type: application/json' --data {shlex.quote(body)} " if body else ""
    return (
        f'curl -sf -X {method} {send}-H "Authorization: token $(cat /opt/labfleet/lab/jupyter_token)" '
        "http://127.0.0.1:8888/lab/api/settings/@jupyterlab/apputils-extension:themes"
    )


def _container_id(host: TestHost) -> str:
    return host_exec(host, f"docker inspect --format '{{{{.Id}}}}' {CONTAINER}").stdout.strip()


def _shm_size(host: TestHost) -> int:
    return int(host_exec(host, f"docker inspect --format '{{{{.HostConfig.ShmSize}}}}' {CONTAINER}").stdout)


def _armed(host: TestHost) -> bool:
    return host_exec(host, f"systemctl is-enabled --quiet {TIMER}", check=False).returncode == 0


def _deferred(result: Result, host: TestHost, reason: str) -> None:
    """The run succeeded, kept the container, printed the deferral line, and armed the timer."""
    assert_converged(result)
    assert result.status(host, BRING_UP) == "no_change", result.stderr_tail()
    lines = [line for line in result.stderr.splitlines() if DEFERRED in line]
    assert len(lines) == 1, result.stderr_tail()
    assert reason in lines[0] and "--data jupyter_update=now" in lines[0], lines[0]
    assert _armed(host), f"{host.name}: {TIMER} is not armed after a deferred update"


@pytest.fixture
def short_timer(monkeypatch):
    # The armed timer checks every 3 s here instead of every minute (labfleet.updates' knob).
    monkeypatch.setenv(updates.CHECK_EVERY_ENV, "3")


def test_an_update_waits_for_a_busy_kernel_and_lands_by_itself_once_idle(make_hosts, lab_data, short_timer):
    (host,) = make_hosts(1, engine=True)
    data = {**lab_data, "jupyter_update_idle": IDLE, "shm_size": "256m"}
    assert_converged(run_pyinfra([host], data=data))
    assert not _armed(host)
    host_exec(host, "head -c 1M /dev/urandom > /srv/workspace/lab/model.bin; chown lab: /srv/workspace/lab/model.bin")
    # Work in HOME, and a JupyterLab setting written through its settings API.
    host_exec(host, f"docker exec -u lab {CONTAINER} sh -c 'echo notes > ~/notes.txt'")
    host_exec(host, _settings_api("PUT", json.dumps({"raw": json.dumps({"theme": "JupyterLab Dark"})})))
    # HOME is checked by what the user put there: the server itself rewrites its runtime files.
    data_dirs = ["/srv/workspace", "/srv/datasets"]
    workspace = checksum_snapshot(host, data_dirs, missing_ok=True)
    old = _container_id(host)

    # A kernel busy in a loop: a deploy with other settings keeps the container and says why.
    kernel = _busy_kernel(host)
    changed = {**data, "shm_size": "512m"}
    _deferred(run_pyinfra([host], data=changed), host, f"kernel {kernel[:8]} (python3) is busy")
    assert _container_id(host) == old
    assert json.loads(jupyter_api(host, f"/kernels/{kernel}"))["execution_state"] == "busy"
    # While it stays busy, the same deploy changes nothing.
    assert_no_changes(run_pyinfra([host], data=changed))

    result, status = run_status([host], changed, as_json=True)
    assert result.rc == 0, status
    (user,) = status["hosts"][0]["users"]
    assert user["pending"] and f"kernel {kernel[:8]} (python3) is busy" in " ".join(user["pending"]), user
    result, lines = run_status([host], changed)
    assert any("lab: update pending" in line and kernel[:8] in line for line in lines), lines

    # Interrupted, and quiet for the idle window: the host's timer recreates the container, no deploy.
    jupyter_api(host, f"/kernels/{kernel}/interrupt", method="POST")
    host_exec(
        host,
        f"for i in $(seq 150); do [ \"$(docker inspect --format '{{{{.Id}}}}' {CONTAINER} 2>/dev/null)\" != {old} ] && "
        f"! systemctl is-enabled --quiet {TIMER} && exit 0; sleep 2; done; exit 1",
        timeout=400,
    )
    assert health(host) == "healthy"
    assert _shm_size(host) == 512 * 2**20
    assert checksum_snapshot(host, data_dirs, missing_ok=True) == workspace, "the update lost files"
    assert host_exec(host, f"docker exec -u lab {CONTAINER} cat /home/lab/notes.txt").stdout == "notes\n"
    assert '"JupyterLab Dark"' in host_exec(host, _settings_api("GET")).stdout, "the setting did not survive"
    assert_no_changes(run_pyinfra([host], data=changed))

    # A GPU process of the container (as a stand-in nvidia-smi reports it) defers the next update.
    host_exec(host, f"docker exec -d {CONTAINER} python3 -c 'import time; time.sleep(3600)  # gpu-standin'")
    pid = host_exec(
        host, "for i in $(seq 50); do p=$(pgrep -f gpu-standin) && echo $p && exit 0; sleep 0.2; done; exit 1"
    ).stdout.split()[0]
    host_exec(host, "cat > /usr/local/bin/nvidia-smi && chmod 755 /usr/local/bin/nvidia-smi",
              input=STANDIN_NVIDIA_SMI.format(pid=pid))  # fmt: skip
    regpu = {**changed, "shm_size": "768m"}
    busy_container = _container_id(host)
    _deferred(run_pyinfra([host], data=regpu), host, f"GPU process {pid} (python3) is running")
    assert _container_id(host) == busy_container

    # jupyter_update=now recreates at once, busy kernel and all, and disarms the timer.
    _busy_kernel(host)
    forced = run_pyinfra([host], data={**regpu, "jupyter_update": "now"})
    assert_converged(forced)
    assert forced.status(host, BRING_UP) == "success"
    assert _container_id(host) != busy_container and _shm_size(host) == 768 * 2**20
    assert not _armed(host)
    host_exec(host, "rm /usr/local/bin/nvidia-smi")
    assert_no_changes(run_pyinfra([host], data={**regpu, "jupyter_update": "now"}))

    # The check by hand: idle now (no kernel, no terminal); a command run in a terminal (here one
    # that `script` opens, as JupyterLab's terminals do) makes it busy.
    check = f"/opt/labfleet/updates/labfleet-busy {CONTAINER} 15"
    assert host_exec(host, check, check=False).returncode == 0
    host_exec(host, f"docker exec -d {CONTAINER} script -qc 'sleep 600; true' /dev/null")
    busy = host_exec(host, f"for i in $(seq 50); do {check} && sleep 0.2 || exit 0; done; exit 1").stdout
    assert "busy: sleep (pid " in busy and "runs in a terminal" in busy, busy
