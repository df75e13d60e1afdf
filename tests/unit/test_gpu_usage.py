"""Who uses which GPU, and idle-kernel culling: the parsers against recorded outputs, the
attribution, the status's GPU section, the jupyter_cull_idle setting and where it reaches the server,
and bench/gpu_check.sh against a STAND-IN nvidia-smi (these machines have no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from test_compose import _project
from test_image import _server_config
from test_report import row

from bench.gpu_check import driver_check
from labfleet import compose, gpu_usage, report
from labfleet.busy_check import parse_time
from labfleet.facts.gpu_usage import (
    GpuUsage,
    container_ids,
    kernel_id,
    number,
    parse_app_line,
    parse_gpu_line,
    parse_gpu_usage,
)
from labfleet.facts.nvidia import parse_gpu_architectures, parse_gpu_host
from labfleet.facts.nvidia_driver import parse_driver_state
from labfleet.planning import FactBatch
from labfleet.settings import SettingsError, build

REPO = Path(__file__).resolve().parents[2]

ALICE = "3f0b5c1e9a7d" + "0" * 52
BOB = "9a9a9a9a9a9a" + "1" * 52
OTHER = "7c7c7c7c7c7c" + "2" * 52
UUID_0 = "GPU-22b2c6ac-2d49-4863-197c-9c469071178a"
UUID_1 = "GPU-2dee1e25-b3b5-007e-2b55-79f2d0f2ebe5"
KERNEL_ALICE = "5e2d7c0a-8f0b-4a53-9a43-2a4c3e6b1f10"
KERNEL_BOB = "0b6f3a44-1c55-4d0e-8e3b-7d44f1c2a9e0"
NOW = 1796212800  # 2026-12-02T12:00:00Z
LAUNCH = "/opt/venv/bin/python3 -m ipykernel_launcher -f /home/{user}/.local/share/jupyter/runtime/kernel-{kernel}.json"

# --- nvidia-smi, recorded -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # A GeForce RTX 2080's name, uuid, utilization.gpu, memory.total and temperature.gpu as
        # `--format=csv,noheader,nounits` printed them (Ricks-Lab/gpu-utils issue #83), in our
        # field order; memory.used added.
        (
            f"0, {UUID_0}, GeForce RTX 2080, 86, 2410, 7979, 45",
            (0, UUID_0, "GeForce RTX 2080", 86, 2410, 7979, 45),
        ),
        # A DGX Spark (GB10, unified memory) reports no memory: "[N/A]" for memory.used and
        # memory.total (NordicHPC/sonar issue #460, mostlygeek/llama-swap issue #782); name and
        # uuid from leptonai/gpud pull request #1170.
        (
            f"0, {UUID_1}, NVIDIA GB10, 0, [N/A], [N/A], 38",
            (0, UUID_1, "NVIDIA GB10", 0, None, None, 38),
        ),
        # Without nounits (sonar #460: "0 %, [N/A], 38"), and "N/A" without brackets as nounits
        # prints it for an unsupported temperature (gpu-utils #83: temperature.memory "N/A").
        (
            f"1, {UUID_1}, NVIDIA GB10, 2 %, [N/A], [Not Supported], N/A",
            (1, UUID_1, "NVIDIA GB10", 2, None, None, None),
        ),
    ],
)
def test_query_gpu_lines_from_recorded_outputs(line, expected):
    gpu = parse_gpu_line(line)
    assert gpu is not None
    fields = ("index", "uuid", "name", "utilization", "memory_used", "memory_total", "temperature")
    assert tuple(gpu[key] for key in fields) == expected  # type: ignore[literal-required]


@pytest.mark.parametrize(
    "line",
    [
        "Failed to initialize NVML: Driver/library version mismatch",
        "NVML library version: 570.86",
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest "
        "NVIDIA driver is installed and running.",
        "",
    ],
)
def test_what_nvidia_smi_says_instead_of_a_report_is_no_gpu(line):
    assert parse_gpu_line(line) is None


def test_compute_apps_lines_from_recorded_outputs():
    # GB10's per-process memory with nounits (llama-swap #782: "GPU-..., 114687, ..., 19135").
    assert parse_app_line(f"{UUID_1}, 114687, 19135") == (UUID_1, 114687, 19135)
    assert parse_app_line(f"{UUID_0}, 41233, [N/A]") == (UUID_0, 41233, None)
    # No compute process: an empty output (gpustat issue #18), or the table's own words
    # "No running processes found" (NVIDIA/nvidia-docker issue #759), which some versions print here.
    assert parse_app_line("") is None
    assert parse_app_line("No running processes found") is None
    assert number("[Insufficient Permissions]") is None and number("24576 MiB") == 24576


# --- cgroups ------------------------------------------------------------------------------------

# cgroup v1, cgroupfs driver: /proc/<pid>/cgroup of a container process as recorded in a public
# paste (pastebin.com/DUXK3egY); labfleet sets the cgroupfs driver on GPU hosts.
V1_CGROUPFS = [
    "11:devices:/docker/34048520ee4dcc79b692911aeb87c104e8f3d9b5a99aa269fa1f2b5a3fcfd1fd",
    "4:memory:/docker/34048520ee4dcc79b692911aeb87c104e8f3d9b5a99aa269fa1f2b5a3fcfd1fd",
    "1:name=systemd:/docker/34048520ee4dcc79b692911aeb87c104e8f3d9b5a99aa269fa1f2b5a3fcfd1fd",
]
RECORDED_ID = "34048520ee4dcc79b692911aeb87c104e8f3d9b5a99aa269fa1f2b5a3fcfd1fd"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (V1_CGROUPFS, [RECORDED_ID]),
        # cgroup v2: Docker's "Runtime metrics" page names /sys/fs/cgroup/system.slice/docker-<id>.scope
        # (systemd driver) and /sys/fs/cgroup/docker/<id> (cgroupfs driver); /proc/<pid>/cgroup has
        # the path after "0::".
        ([f"0::/system.slice/docker-{ALICE}.scope"], [ALICE]),
        ([f"0::/docker/{ALICE}"], [ALICE]),
        # cgroup v1 with the systemd driver.
        (
            [f"12:pids:/system.slice/docker-{ALICE}.scope", f"1:name=systemd:/system.slice/docker-{ALICE}.scope"],
            [ALICE],
        ),
        # An engine inside a container (the test hosts): the outer container first.
        ([f"0::/docker/{OTHER}/docker/{ALICE}"], [OTHER, ALICE]),
        # Outside any container.
        (["0::/user.slice/user-1000.slice/session-2.scope"], []),
        (["0::/system.slice/display-manager.service", "1:name=systemd:/"], []),
        ([], []),
    ],
)
def test_container_ids_under_each_cgroup_layout(lines, expected):
    assert container_ids(lines) == expected


def test_kernel_id_from_the_kernels_command_line():
    assert kernel_id(LAUNCH.format(user="lab", kernel=KERNEL_BOB)) == KERNEL_BOB
    assert kernel_id("python train.py --epochs 10") is None


# --- One host's report ------------------------------------------------------------------------


def host_output(error: str | None = None) -> list[str]:
    """What GpuUsage prints on a host with two GPUs and four compute processes."""
    if error:
        return ["nvidia-smi", f"now {NOW}", "gpu-rc 18", f"gpu {error}", f"app {error}"]
    lines = [
        "nvidia-smi",
        f"now {NOW}",
        "gpu-rc 0",
        f"gpu 0, {UUID_0}, NVIDIA RTX A6000, 87, 30720, 49140, 71",
        f"gpu 1, {UUID_1}, NVIDIA RTX A6000, 0, 10245, 49140, 40",
        f"app {UUID_0}, 41233, 20480",
        f"app {UUID_1}, 7777, 10240",
        f"app {UUID_0}, 5120, 512",
        f"app {UUID_0}, 9001, 4096",
        f"app {UUID_1}, 31337, 5",
        # alice: cgroup v2, systemd driver; a kernel running a cell
        f"cgroup 41233 0::/system.slice/docker-{ALICE}.scope",
        "cmd 41233 " + LAUNCH.format(user="alice", kernel=KERNEL_ALICE),
        "owner 41233 alice",
        # bob: cgroup v1, cgroupfs driver; a kernel idle for two days
        f"cgroup 7777 12:pids:/docker/{BOB}",
        f"cgroup 7777 1:name=systemd:/docker/{BOB}",
        "cmd 7777 " + LAUNCH.format(user="bob", kernel=KERNEL_BOB),
        "owner 7777 bob",
        # a desktop on the host
        "cgroup 5120 0::/system.slice/display-manager.service",
        "cmd 5120 /usr/lib/xorg/Xorg :0",
        "owner 5120 root",
        # a container of another compose project
        f"cgroup 9001 0::/docker/{OTHER}",
        "cmd 9001 python serve.py",
        "owner 9001 root",
        # pid 31337 ended before its cgroup was read: no lines
        f"container {ALICE} labfleet-alice-jupyterlab-1 labfleet-alice",
        f"container {BOB} labfleet-bob-jupyterlab-1 labfleet-bob",
        f"container {OTHER} vllm-server-1 vllm",
        # Recorded from jupyter_server 2.21 (GET /api/kernels), as the container printed them.
        f"kernel {ALICE} {KERNEL_ALICE} busy 2026-12-02T11:59:58.412345Z 1",
        f"kernel {BOB} {KERNEL_BOB} idle 2026-11-30T10:00:00.000000Z 0",
        f"kernel {BOB} c1d2e3f4-0000-4000-8000-000000000001 idle 2026-12-01T08:00:00.000000Z 0",
    ]
    return lines


def test_the_report_is_parsed_by_what_each_line_carries():
    state = parse_gpu_usage(host_output())
    assert state["smi"] and state["error"] is None and state["now"] == NOW
    assert [g["index"] for g in state["gpus"]] == [0, 1]
    processes = {p["pid"]: p for p in state["processes"]}
    assert processes[7777]["cgroup"] == [f"12:pids:/docker/{BOB}", f"1:name=systemd:/docker/{BOB}"]
    assert processes[7777]["owner"] == "bob" and processes[31337]["cgroup"] == []
    assert {c["project"] for c in state["containers"]} == {"labfleet-alice", "labfleet-bob", "vllm"}
    assert [k["id"] for k in state["kernels"][BOB]] == [KERNEL_BOB, "c1d2e3f4-0000-4000-8000-000000000001"]
    assert state["kernels"][BOB][0]["last_activity"] == parse_time("2026-11-30T10:00:00.000000Z")


def test_each_process_is_attributed_to_its_user_with_memory_per_user():
    use = gpu_usage.host_gpu_use(parse_gpu_usage(host_output()), 86400)
    assert use is not None
    gpu0, gpu1 = use["gpus"]
    assert [(u["user"], u["lab_user"], u["memory"]) for u in gpu0["users"]] == [
        ("alice", True, 20480),
        ("project vllm", False, 4096),
        ("host account root", False, 512),
    ]
    assert [(u["user"], u["memory"]) for u in gpu1["users"]] == [("bob", 10240), ("pid 31337", 5)]
    # alice's kernel runs a cell: not idle. bob's has been idle since 2026-11-30T10:00Z: marked.
    (alice,) = gpu0["users"][0]["processes"]
    assert (alice["kernel"], alice["kernel_state"], alice["idle_seconds"]) == (KERNEL_ALICE, "busy", None)
    assert alice["idle_past_cull"] is False
    (bob,) = gpu1["users"][0]["processes"]
    assert (bob["kernel"], bob["idle_seconds"], bob["idle_past_cull"]) == (KERNEL_BOB, 2 * 86400 + 7200, True)


def test_idle_kernels_are_marked_only_past_the_cull_and_never_with_off():
    state = parse_gpu_usage(host_output())
    for cull, marked in ((3 * 86400, False), (0, False), (3600, True)):
        use = gpu_usage.host_gpu_use(state, cull)
        assert use is not None
        (bob,) = use["gpus"][1]["users"][0]["processes"]
        assert bob["idle_seconds"] == 2 * 86400 + 7200, "the idle time shows whatever the cull"
        assert bob["idle_past_cull"] is marked, cull


def test_the_status_has_a_gpu_section_and_a_note_per_idle_kernel():
    use = gpu_usage.host_gpu_use(parse_gpu_usage(host_output()), 86400)
    rows = [row("pc01", gpus=2, gpu_names=["NVIDIA RTX A6000"] * 2, gpu_use=use), row("pc02", gpu_use=None)]
    text = report.table(rows, report.drift(rows))
    lines = text.splitlines()
    start = lines.index("") + 1
    section = lines[start:]
    assert section[0].split() == ["host", "gpu", "model", "util", "memory", "temp", "users"]
    assert section[1].split()[:9] == ["pc01", "0", "NVIDIA", "RTX", "A6000", "87%", "30.0G/48.0G", "71C", "alice"]
    assert "alice 20.0G (kernel 5e2d7c0a busy)," in section[1], "a busy kernel shows no idle time"
    assert "project vllm 4.0G" in section[1] and "host account root 0.5G" in section[1]
    assert section[2].startswith("!  pc01  1"), section[2]
    assert "bob 10.0G (!kernel 0b6f3a44 idle 2d02h)" in section[2]
    assert not any("pc02" in line for line in section), "a host without nvidia-smi has no GPU lines"
    (note,) = gpu_usage.idle_notes([("pc01", use)])
    assert note.startswith("pc01: GPU 1: bob's kernel 0b6f3a44 has been idle 2d02h (past jupyter_cull_idle, 1d00h)")
    document = report.document(rows, report.drift(rows), {})
    gpus = document["hosts"][0]["gpu_use"]["gpus"]
    assert gpus[1]["users"][0]["memory"] == 10240 and gpus[1]["users"][0]["processes"][0]["idle_past_cull"]
    json.dumps(document)


def test_a_driver_library_mismatch_is_shown_in_nvidia_smis_words():
    state = parse_gpu_usage(host_output("Failed to initialize NVML: Driver/library version mismatch"))
    assert state["error"] == "Failed to initialize NVML: Driver/library version mismatch"
    assert state["gpus"] == [] and state["processes"] == []
    lines = gpu_usage.gpu_lines([("pc03", gpu_usage.host_gpu_use(state, 86400))])
    assert lines[1].split()[:3] == ["!", "pc03", "-"]
    assert "nvidia-smi: Failed to initialize NVML: Driver/library version mismatch" in lines[1]


def test_a_host_without_nvidia_smi_has_no_gpu_section():
    assert GpuUsage().process([]) == GpuUsage.default()
    assert gpu_usage.host_gpu_use(GpuUsage.default(), 86400) is None
    assert gpu_usage.gpu_lines([("pc02", None)]) == []


# --- The fact's own command, with a STAND-IN nvidia-smi -----------------------------------------

STANDIN = """#!/bin/sh
# STAND-IN nvidia-smi (tests/unit/test_gpu_usage.py): no GPU here. It reports one GPU and, as its
# compute process, the real process whose pid is in $STANDIN_PID.
case "$*" in
*--query-gpu=index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu*)
  echo "0, GPU-22b2c6ac-2d49-4863-197c-9c469071178a, NVIDIA RTX A6000, 87, 30720, 49140, 71" ;;
*--query-compute-apps=gpu_uuid,pid,used_memory*)
  echo "GPU-22b2c6ac-2d49-4863-197c-9c469071178a, $STANDIN_PID, 1234" ;;
*) echo "stand-in nvidia-smi: $*" >&2; exit 9 ;;
esac
"""


@pytest.fixture
def standin_smi(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(STANDIN)
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_PID", str(os.getpid()))


def test_the_facts_command_reads_a_real_process_in_a_batch(standin_smi):
    fact = FactBatch()
    command = fact.command(parts=((GpuUsage, {}),))
    done = subprocess.run(["sh", "-c", str(command)], capture_output=True, text=True, timeout=60, check=True)
    (state,) = fact.process(done.stdout.splitlines())
    assert state["smi"] and state["error"] is None and state["gpus"][0]["name"] == "NVIDIA RTX A6000"
    (process,) = state["processes"]
    assert process["pid"] == os.getpid() and process["memory"] == 1234
    assert process["cgroup"] == Path(f"/proc/{os.getpid()}/cgroup").read_text().splitlines()
    assert "pytest" in process["command"] or "python" in process["command"]


def test_bench_gpu_check_runs_the_facts_against_the_standin(standin_smi):
    done = subprocess.run([str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "GpuHost: " in done.stdout and "NvidiaDriver: module -" in done.stdout
    assert "NVIDIA RTX A6000  87%" in done.stdout
    assert f"GPU 0: pid {os.getpid()} -> " in done.stdout
    found = subprocess.run(
        [str(REPO / "bench" / "gpu_check.sh"), "--json", "--cull", "off"], capture_output=True, text=True, timeout=120
    )
    document = json.loads(found.stdout)
    assert document["gpu_use"]["gpus"][0]["users"][0]["memory"] == 1234
    assert document["gpu_use"]["cull_seconds"] == 0
    bad = subprocess.run([str(REPO / "bench" / "gpu_check.sh"), "--cull", "soon"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--cull 'soon': expected \"off\" or a duration" in bad.stderr


def test_bench_gpu_check_names_each_problem_in_the_deploys_words():
    """Every line the check prints as a problem: the reboot-needed line, nvidia-smi's own error,
    GPUs without a module, and the compute-capability refusal (Pascal on the 12.8 image)."""
    gpus = parse_gpu_host(["pci 0000:01:00.0 0x030000"])
    loaded = {**gpus, "driver": "570.86.15"}
    driver = parse_driver_state(
        ["proc NVRM version: NVIDIA UNIX x86_64 Kernel Module  565.57.01  Thu Oct 10 2024", "nvml 570.86.15"]
    )
    usage = parse_gpu_usage(host_output("Failed to initialize NVML: Driver/library version mismatch"))
    assert driver_check("pc03", loaded, driver, usage) == [
        "pc03 runs module 565.57.01 but 570.86.15 is installed: reboot pc03",
        "nvidia-smi: Failed to initialize NVML: Driver/library version mismatch",
    ]
    no_module = driver_check("pc03", gpus, parse_driver_state([]), parse_gpu_usage([]))
    assert no_module == ["NVIDIA GPUs but no loaded nvidia kernel module"]
    pascal = parse_gpu_architectures(["0, NVIDIA GeForce GTX 1080, 6.1"])
    (refused,) = driver_check("pc03", loaded, parse_driver_state([]), parse_gpu_usage([]), pascal, "12.8")
    assert refused.startswith("host pc03: GPU 0 (NVIDIA GeForce GTX 1080) has compute capability 6.1")
    assert driver_check("pc03", loaded, parse_driver_state([]), parse_gpu_usage([]), pascal, "12.6") == []


def test_bench_gpu_check_says_so_where_there_is_no_gpu(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "GpuUsage: no nvidia-smi on this machine" in done.stdout


# --- jupyter_cull_idle ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("24h", 86400), ("30m", 1800), ("2d", 172800), ("off", 0)])
def test_jupyter_cull_idle_is_off_or_a_duration(raw, value, seconds):
    assert build("pc01", {**raw, "jupyter_cull_idle": value}).jupyter_cull_idle == seconds
    assert build("pc01", raw).jupyter_cull_idle == 86400


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("never", ""),
        ("24 h", ""),
        (86400, ""),
        (False, ""),
        ("0m", ' (a zero duration; write "off" to keep idle kernels)'),
    ],
)
def test_a_bad_jupyter_cull_idle_is_one_line_naming_host_key_value_and_form(raw, value, detail):
    with pytest.raises(SettingsError) as error:
        build("pc07", {**raw, "jupyter_cull_idle": value})
    message = str(error.value)
    assert message == (
        f"host pc07: jupyter_cull_idle = {value!r} is invalid{detail}; "
        'expected "off" or a duration like "30m", "12h" or "2d"'
    )


def test_the_cull_reaches_the_container_through_env_and_changes_its_config_digest(raw):
    day = _project(dict(raw))
    env = compose.env_values(day)
    assert env["JUPYTER_CULL_IDLE_SECONDS"] == 86400
    service = yaml.safe_load(compose.render_compose(day))["services"]["jupyterlab"]
    assert service["environment"]["JUPYTER_CULL_IDLE_SECONDS"] == "${JUPYTER_CULL_IDLE_SECONDS}"
    assert "JUPYTER_CULL_IDLE_SECONDS=86400" in compose.render_env(day).replace("'", "")
    off = _project(dict(raw), jupyter_cull_idle="off")
    assert compose.env_values(off)["JUPYTER_CULL_IDLE_SECONDS"] == 0
    # A changed cull is a changed container: the next deploy recreates it (when idle).
    assert compose.project_digest(day) != compose.project_digest(off)
    assert compose.project_digest(day) == compose.project_digest(_project(dict(raw), jupyter_cull_idle="1d"))


@pytest.mark.parametrize(
    ("seconds", "timeout", "interval"),
    [("86400", 86400, 300), ("1800", 1800, 300), ("20", 20, 10), ("1", 1, 1)],
)
def test_the_server_config_culls_idle_kernels_connected_or_not_but_never_busy_ones(
    monkeypatch, seconds, timeout, interval
):
    c = _server_config(monkeypatch, JUPYTER_CULL_IDLE_SECONDS=seconds)
    kernels = c.MappingKernelManager
    assert (kernels.cull_idle_timeout, kernels.cull_interval) == (timeout, interval)
    assert kernels.cull_connected is True and kernels.cull_busy is False


@pytest.mark.parametrize("seconds", ["0", None])
def test_the_server_config_leaves_culling_off_for_off_or_without_labfleet(monkeypatch, seconds):
    monkeypatch.delenv("JUPYTER_CULL_IDLE_SECONDS", raising=False)
    env = {} if seconds is None else {"JUPYTER_CULL_IDLE_SECONDS": seconds}
    c = _server_config(monkeypatch, **env)
    assert "MappingKernelManager" not in vars(c)


def test_the_server_config_stops_on_a_cull_that_is_not_seconds(monkeypatch):
    with pytest.raises(SystemExit) as stop:
        _server_config(monkeypatch, JUPYTER_CULL_IDLE_SECONDS="24h")
    assert str(stop.value) == "labfleet: JUPYTER_CULL_IDLE_SECONDS='24h' is not a number of seconds"
