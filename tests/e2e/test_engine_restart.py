"""dockerd restarts and reloads under a running JupyterLab and a live kernel (labfleet/docker.py).

One engine host carries the whole story, so that JupyterLab is shipped and brought up once:

1. its daemon.json sets "live-restore": false by hand; the deploy keeps it and warns, on
   every run, in one line that names the host;
2. the admin deletes the key, as the warning says, and a kernel is started through the
   server's websocket and kept busy in a loop; a deploy with a log-opts change (restart-only) reloads dockerd to turn
   live-restore on, then restarts it: dockerd's PID changes, the container, its kernel and
   the workspace do not;
3. a deploy that adds daemon labels (reloadable) reloads dockerd without restarting it,
   with the same container and kernel; the next run changes nothing.
"""

from __future__ import annotations

import json
import shlex

from .harness.hosts import TestHost, host_exec
from .harness.runner import Result, assert_converged, assert_no_changes
from .harness.snapshots import checksum_snapshot
from .probes import run_cell

DAEMON_JSON = "/etc/docker/daemon.json"
CONTAINER = "labfleet-lab-jupyterlab-1"
API = "http://127.0.0.1:8888/api"
DAEMON_STEP = "Merge settings into /etc/docker/daemon.json"
WARNING = 'sets "live-restore": false by hand'


def sh(host: TestHost, command: str) -> str:
    return host_exec(host, command, timeout=120).stdout.strip()


def jupyter_api(host: TestHost, method: str, path: str) -> dict | list:
    """The JSON answer of JupyterLab's REST API, over the published loopback port, with the token."""
    token = sh(host, "cat /opt/labfleet/lab/jupyter_token")
    answer = sh(
        host, f"curl -sf -X {method} -H {shlex.quote('Authorization: token ' + token)} {shlex.quote(API + path)}"
    )
    return json.loads(answer)


def kernel_process(host: TestHost, kernel_id: str) -> str:
    """The PID of the kernel's process (its command line names its connection file), seen from the host."""
    # "[k]" keeps pgrep from matching the shell that runs it, whose command line holds the pattern.
    return sh(host, f"pgrep -f {shlex.quote('[k]ernel-' + kernel_id)}")


def kernel_state(host: TestHost, kernel_id: str) -> str:
    answer = jupyter_api(host, "GET", f"/kernels/{kernel_id}")
    assert isinstance(answer, dict)
    return answer["execution_state"]


def engine(host: TestHost) -> dict:
    """What the test watches: dockerd's PID, its live-restore and labels, the container's start."""
    info = json.loads(sh(host, "docker info --format '{{json .}}'"))
    return {
        "dockerd": sh(host, "systemctl show --property=MainPID --value docker.service"),
        "live_restore": info["LiveRestoreEnabled"],
        "labels": info["Labels"] or [],
        "started_at": sh(host, f"docker inspect --format '{{{{.State.StartedAt}}}}' {CONTAINER}"),
    }


def warnings(result: Result, host: TestHost) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if WARNING in line and host.name in line]


def test_dockerd_restarts_and_reloads_under_a_live_kernel(make_hosts, pyinfra_run, lab_data):
    (host,) = make_hosts(1, engine=True)
    host_exec(host, f"cat > {DAEMON_JSON}", input='{"live-restore": false}\n')

    kept = pyinfra_run([host], data=lab_data)
    assert_converged(kept)
    assert json.loads(sh(host, f"cat {DAEMON_JSON}")) == {"live-restore": False}
    assert engine(host)["live_restore"] is False
    (warning,) = warnings(kept, host)
    assert 'docker_daemon = {"live-restore": true}' in warning
    again = pyinfra_run([host], data=lab_data)
    assert_no_changes(again)
    assert len(warnings(again, host)) == 1, "a run that changes nothing warns once too"

    # The admin follows the warning: the key goes, while the engine keeps running without it.
    host_exec(host, f"echo '{{}}' > {DAEMON_JSON}")
    # Through the server's own websocket, so the server sees the kernel busy (a kernel made busy
    # behind its back can stay "starting" there when its status came before the server listened).
    kernel = {"id": run_cell(host, CONTAINER, "import time\nwhile True:\n    time.sleep(0.5)", until="busy")}
    pid = kernel_process(host, kernel["id"])
    assert pid, f"{host.name}: no process for kernel {kernel['id']}"
    assert kernel_state(host, kernel["id"]) == "busy", f"{host.name}: the server does not see the kernel busy"
    host_exec(host, "head -c 1M /dev/urandom > /srv/workspace/lab/model.bin; chown lab: /srv/workspace/lab/model.bin")
    workspace = checksum_snapshot(host, ["/srv/workspace"])
    before = engine(host)

    def assert_kept(after: dict, what: str) -> None:
        assert after["started_at"] == before["started_at"], f"{host.name}: the container restarted with {what}"
        kernels = jupyter_api(host, "GET", "/kernels")
        assert kernel["id"] in [k["id"] for k in kernels], f"{host.name}: the kernel is gone after {what}"
        assert kernel_process(host, kernel["id"]) == pid, f"{host.name}: the kernel process changed with {what}"
        assert kernel_state(host, kernel["id"]) == "busy", f"{host.name}: the kernel stopped its loop with {what}"
        assert checksum_snapshot(host, ["/srv/workspace"]) == workspace, f"{host.name}: workspace changed by {what}"

    restart_data = {**lab_data, "docker_daemon": {"log-opts": {"max-size": "10m"}}}
    restarted = pyinfra_run([host], data=restart_data)
    assert_converged(restarted)
    assert restarted.status(host, DAEMON_STEP) == "success"
    assert json.loads(sh(host, f"cat {DAEMON_JSON}")) == {"live-restore": True, "log-opts": {"max-size": "10m"}}
    after_restart = engine(host)
    assert after_restart["dockerd"] != before["dockerd"], f"{host.name}: dockerd was not restarted for log-opts"
    assert after_restart["live_restore"] is True
    assert_kept(after_restart, "a dockerd restart")
    assert not warnings(restarted, host)

    reload_data = {**lab_data, "docker_daemon": {"log-opts": {"max-size": "10m"}, "labels": ["lab.role=jupyter"]}}
    reloaded = pyinfra_run([host], data=reload_data)
    assert_converged(reloaded)
    assert reloaded.status(host, DAEMON_STEP) == "success"
    after_reload = engine(host)
    assert after_reload["labels"] == ["lab.role=jupyter"], f"{host.name}: the reload did not apply the labels"
    assert after_reload["dockerd"] == after_restart["dockerd"], f"{host.name}: dockerd restarted for labels"
    assert_kept(after_reload, "a dockerd reload")

    assert_no_changes(pyinfra_run([host], data=reload_data))
