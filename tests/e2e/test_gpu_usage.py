"""Idle-kernel culling and "who uses which GPU" on a real host with a real Jupyter server.

One host serves every step: a deploy with a short ``jupyter_cull_idle`` and a real kernel that the
server culls by itself once idle; a changed cull that reaches the running container on the next
deploy; then a STAND-IN nvidia-smi (these machines have no GPU: a script on the test host that
prints nvidia-smi's csv, recorded format) that lists the host PID of a REAL kernel process of the
REAL JupyterLab container as a GPU compute app. The status maps that PID through its cgroup to the
container, through the container's compose project to the lab user, and through the user's own
Jupyter server to the kernel and its idle time. Every second deploy changes nothing.
"""

from __future__ import annotations

import json
import time

from .harness.hosts import TestHost, host_exec
from .harness.runner import assert_converged, assert_no_changes, run_pyinfra
from .probes import jupyter_api, run_cell
from .test_status import run_status

CONTAINER = "labfleet-lab-jupyterlab-1"
BRING_UP = "Bring up JupyterLab of lab"
UUID = "GPU-22b2c6ac-2d49-4863-197c-9c469071178a"

STANDIN_NVIDIA_SMI = """#!/bin/sh
# STAND-IN nvidia-smi written by tests/e2e/test_gpu_usage.py: this machine has no GPU. It prints
# one GPU and one compute app, the real process {pid}, in nvidia-smi's csv format.
case "$*" in
*--query-gpu=*) echo "0, {uuid}, NVIDIA RTX A6000, 87, 30720, 49140, 71" ;;
*--query-compute-apps=gpu_uuid,pid,used_memory*) echo "{uuid}, {pid}, 1234" ;;
*--query-compute-apps=pid,process_name*) echo "{pid}, python3" ;;
*) echo "stand-in nvidia-smi: $* is not supported" >&2; exit 9 ;;
esac
"""


def _start_kernel(host: TestHost) -> str:
    """A kernel that ran one cell and was left idle."""
    return run_cell(host, CONTAINER, "weights = list(range(1000))", until="idle")


def _kernels(host: TestHost) -> list[str]:
    return [kernel["id"] for kernel in json.loads(jupyter_api(host, "/kernels"))]


def _container(host: TestHost) -> tuple[str, str]:
    """The container's id and the cull seconds it was started with."""
    found = host_exec(host, f"docker inspect --format '{{{{.Id}}}} {{{{json .Config.Env}}}}' {CONTAINER}").stdout
    cid, _, env = found.partition(" ")
    (cull,) = [item.split("=", 1)[1] for item in json.loads(env) if item.startswith("JUPYTER_CULL_IDLE_SECONDS=")]
    return cid, cull


def test_idle_kernels_are_culled_and_the_status_names_who_uses_the_gpu(make_hosts, lab_data):
    (host,) = make_hosts(1, engine=True)

    # A short cull: the server itself shuts an idle kernel down.
    short = {**lab_data, "jupyter_cull_idle": "20s"}
    assert_converged(run_pyinfra([host], data=short))
    first, cull = _container(host)
    assert cull == "20"
    assert "JUPYTER_CULL_IDLE_SECONDS='20'" in host_exec(host, "cat /opt/labfleet/lab/.env").stdout
    kernel = _start_kernel(host)
    assert kernel in _kernels(host)
    host_exec(
        host,
        f'for i in $(seq 60); do curl -sf -H "Authorization: token $(cat /opt/labfleet/lab/jupyter_token)" '
        f"http://127.0.0.1:8888/api/kernels | grep -q {kernel} || exit 0; sleep 2; done; exit 1",
        timeout=200,
    )
    assert_no_changes(run_pyinfra([host], data=short))

    # A changed cull reaches the running container on the next deploy (it is idle: recreated now).
    data = {**lab_data, "jupyter_cull_idle": "2d"}
    changed = run_pyinfra([host], data=data)
    assert_converged(changed)
    assert changed.status(host, BRING_UP) == "success"
    second, cull = _container(host)
    assert second != first and cull == "172800"
    assert_no_changes(run_pyinfra([host], data=data))

    # A real kernel of the container, reported by the stand-in nvidia-smi as a GPU compute app.
    kernel = _start_kernel(host)
    pid = host_exec(
        host, f"for i in $(seq 100); do p=$(pgrep -f 'kernel-{kernel}') && echo $p && exit 0; sleep 0.2; done; exit 1"
    ).stdout.split()[0]
    host_exec(host, "cat > /usr/local/bin/nvidia-smi && chmod 755 /usr/local/bin/nvidia-smi",
              input=STANDIN_NVIDIA_SMI.format(pid=pid, uuid=UUID))  # fmt: skip

    result, status = run_status([host], data, as_json=True)
    assert result.rc == 0, status
    use = status["hosts"][0]["gpu_use"]
    assert use["error"] is None
    (gpu,) = use["gpus"]
    assert (gpu["index"], gpu["uuid"], gpu["name"], gpu["memory_used"], gpu["memory_total"]) == (
        0, UUID, "NVIDIA RTX A6000", 30720, 49140,
    )  # fmt: skip
    (user,) = gpu["users"]
    assert (user["user"], user["lab_user"], user["memory"]) == ("lab", True, 1234), user
    (process,) = user["processes"]
    assert process["pid"] == int(pid) and process["kernel"] == kernel
    assert process["kernel_state"] == "idle" and process["idle_seconds"] is not None, process
    assert process["idle_past_cull"] is False, process
    assert status["hosts"][0]["gpu_names"] == ["NVIDIA RTX A6000"]

    result, lines = run_status([host], data)
    assert result.rc == 0, lines
    gpu_line = lines[lines.index("") + 2]
    assert gpu_line.split()[:3] == [host.name, "0", "NVIDIA"], lines
    assert f"lab 1.2G (kernel {kernel[:8]} idle " in gpu_line, lines

    # Measured against a cull shorter than the kernel's idle time, the kernel is marked and named.
    time.sleep(2)  # the kernel's idle time passes the 1 s cull below; nothing is timed
    result, status = run_status([host], {**data, "jupyter_cull_idle": "1s"}, as_json=True, expect_fail=True)
    (process,) = status["hosts"][0]["gpu_use"]["gpus"][0]["users"][0]["processes"]
    assert process["idle_past_cull"] is True, process
    assert any(f"lab's kernel {kernel[:8]} has been idle" in note for note in status["notes"]), status["notes"]
    # The drift is only that the container runs another cull than the one asked for here.
    assert status["drift"] == {host.name: ["lab: container runs other settings; run the deploy"]}, status["drift"]

    # With the GPU process in place, the deploy still changes nothing.
    assert_no_changes(run_pyinfra([host], data=data))
