"""Updates that wait for idle work: the busy check against recorded outputs, its facts, the operations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from labfleet import busy_check, jupyter, updates
from labfleet.facts.updates import ContainerBusy, PendingUpdate, TimersArmed, parse_busy
from labfleet.settings import SettingsError, build

IMAGE = "labfleet/jupyterlab:jupyter-0123456789ab"
CONTAINER_ID = "3f0b5c1e9a7d" + "0" * 52
OTHER_ID = "9a9a9a9a9a9a" + "1" * 52
NOW = busy_check.parse_time("2026-12-02T10:00:00.000000Z")

# Recorded from jupyter_server 2.21 (GET /api/kernels, GET /api/terminals).
KERNELS = [
    {
        "id": "5e2d7c0a-8f0b-4a53-9a43-2a4c3e6b1f10",
        "name": "python3",
        "last_activity": "2026-12-02T09:59:58.412345Z",
        "execution_state": "busy",
        "connections": 1,
    },
    {
        "id": "0b6f3a44-1c55-4d0e-8e3b-7d44f1c2a9e0",
        "name": "python3",
        "last_activity": "2026-12-02T09:50:00.000000Z",
        "execution_state": "idle",
        "connections": 0,
    },
    {
        "id": "c1d2e3f4-0000-4000-8000-000000000001",
        "name": "bash",
        "last_activity": "2026-12-01T08:00:00.000000Z",
        "execution_state": "idle",
        "connections": 0,
    },
]
TERMINALS = [{"name": "1", "last_activity": "2026-12-02T07:12:44.100000Z"}]

# What labfleet-busy hands over: nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader,
# each line followed by that process's /proc/<pid>/cgroup.
GPU_APPS = "\n".join(
    [
        "app 41233, /opt/venv/bin/python3",
        # cgroup v2 with the systemd driver
        f"cgroup 0::/system.slice/docker-{CONTAINER_ID}.scope",
        "app 5120, /usr/bin/Xorg",
        "cgroup 0::/system.slice/display-manager.service",
        "app 7777, python",
        # cgroup v1, another container
        f"cgroup 12:pids:/docker/{OTHER_ID}",
        f"cgroup 1:name=systemd:/docker/{OTHER_ID}",
    ]
)


def test_a_busy_kernel_and_one_active_within_the_window_keep_the_container():
    reasons = busy_check.kernel_reasons(KERNELS, NOW, idle_seconds=30 * 60)
    assert reasons == [
        "kernel 5e2d7c0a (python3) is busy",
        "kernel 0b6f3a44 (python3) was active 10m ago (idle for 20m more)",
    ]


def test_kernels_quiet_for_longer_than_the_window_are_idle():
    idle = [dict(kernel, execution_state="idle") for kernel in KERNELS]
    assert busy_check.kernel_reasons(idle, NOW, idle_seconds=1) == []
    assert busy_check.kernel_reasons([dict(KERNELS[0], execution_state="starting")], NOW, 1) == [
        "kernel 5e2d7c0a (python3) is starting"
    ]


def test_a_kernel_without_a_readable_last_activity_counts_as_busy():
    (reason,) = busy_check.kernel_reasons([{"id": "abc", "name": "python3", "execution_state": "idle"}], NOW, 60)
    assert reason == "kernel abc (python3) has no known last activity"


def test_a_terminal_counts_while_it_was_active_within_the_window():
    assert busy_check.terminal_reasons(TERMINALS, NOW, idle_seconds=30 * 60) == []
    assert busy_check.terminal_reasons(TERMINALS, NOW, idle_seconds=3 * 3600) == ["terminal 1 was active 2h47m ago"]
    assert busy_check.terminal_reasons([], NOW, 60) == []


# Recorded from a JupyterLab container (/proc/<pid>/stat): docker-init, tini, the server, a
# kernel, a terminal's bash (its session's leader, on /dev/pts/0 = tty_nr 34816), a training
# script run from that shell, and a nohup job started there with "&".
PROC_STATS = [
    "1 (docker-init) S 0 1 1 0 -1 4194560 1115 0 0 0 0 0 0 0 20 0 1 0 4520",
    "7 (tini) S 1 7 1 0 -1 4194560 92 0 0 0 0 0 0 0 20 0 1 0 4521",
    "8 (jupyter-lab) S 7 8 1 0 -1 4194560 81123 0 0 0 310 42 0 0 20 0 9 0 4522",
    "211 (python) S 8 211 211 0 -1 4194560 31882 0 0 0 170 20 0 0 20 0 11 0 9876",
    "340 (bash) S 8 340 340 34816 412 4194560 1601 0 0 0 1 0 0 0 20 0 1 0 12000",
    "412 (python train.py) R 340 412 340 34816 412 4194304 11111 0 0 0 900 3 0 0 20 0 4 0 12500",
    "430 (sleep) S 340 430 340 34816 412 1077936128 99 0 0 0 0 0 0 0 20 0 1 0 12600",
]


def test_commands_running_in_a_terminal_keep_the_container_and_an_idle_shell_does_not():
    assert busy_check.terminal_commands(PROC_STATS) == [
        "python train.py (pid 412) runs in a terminal",
        "sleep (pid 430) runs in a terminal",
    ]
    assert busy_check.terminal_commands(PROC_STATS[:5]) == []
    assert busy_check.terminal_commands(["garbage", ""]) == []


@pytest.mark.parametrize(
    "cgroup",
    [
        f"0::/system.slice/docker-{CONTAINER_ID}.scope",  # v2, systemd driver
        f"0::/docker/{CONTAINER_ID}",  # v2, cgroupfs driver
        f"4:memory:/docker/{CONTAINER_ID}",  # v1
        f"4:memory:/lf-host/docker/{CONTAINER_ID}",  # an engine inside a container
    ],
)
def test_a_gpu_process_is_mapped_to_its_container_by_cgroup(cgroup):
    assert busy_check.in_container([cgroup], CONTAINER_ID)
    assert not busy_check.in_container([cgroup], OTHER_ID)
    assert not busy_check.in_container([cgroup], "")


def test_only_the_gpu_processes_of_this_container_keep_it():
    assert busy_check.gpu_reasons(GPU_APPS, CONTAINER_ID) == ["GPU process 41233 (/opt/venv/bin/python3) is running"]
    assert busy_check.gpu_reasons(GPU_APPS, OTHER_ID) == ["GPU process 7777 (python) is running"]
    assert busy_check.gpu_reasons("", CONTAINER_ID) == []


def test_jupyter_times_are_read_with_and_without_fractions():
    assert busy_check.parse_time("2026-12-02T09:59:00Z") == NOW - 60
    assert busy_check.parse_time("2026-12-02T09:59:00.5+00:00") == NOW - 59.5
    assert busy_check.parse_time("yesterday") is None and busy_check.parse_time(None) is None


def test_the_check_prints_busy_lines_and_exits_1_while_busy(monkeypatch, capsys):
    monkeypatch.setattr(busy_check, "server_reasons", lambda now, idle: (["kernel 5e2d7c0a (python3) is busy"], []))
    monkeypatch.setattr(busy_check, "_process_stats", lambda: PROC_STATS[:5])
    monkeypatch.setenv("LABFLEET_GPU_APPS", GPU_APPS)
    monkeypatch.setenv("LABFLEET_CONTAINER_ID", CONTAINER_ID)
    assert busy_check.main() == 1
    assert capsys.readouterr().out.splitlines() == [
        "busy: kernel 5e2d7c0a (python3) is busy",
        "busy: GPU process 41233 (/opt/venv/bin/python3) is running",
    ]
    monkeypatch.setattr(busy_check, "server_reasons", lambda now, idle: ([], []))
    monkeypatch.setenv("LABFLEET_GPU_APPS", "")
    assert busy_check.main() == 0


def test_a_server_that_does_not_answer_is_a_note_not_a_reason_to_wait(monkeypatch, tmp_path):
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    monkeypatch.setenv("JUPYTER_TOKEN_FILE", str(token))
    monkeypatch.setattr(busy_check, "API", "http://127.0.0.1:9/api")
    busy, notes = busy_check.server_reasons(NOW, 60)
    assert busy == [] and len(notes) == 1 and "did not answer" in notes[0]


def test_the_busy_facts_parse_the_scripts_verdict():
    busy = parse_busy(["busy: kernel 5e2d7c0a (python3) is busy", "note: x", "exit 1"])
    assert busy == {"checked": True, "busy": True, "reasons": ["kernel 5e2d7c0a (python3) is busy"], "notes": ["x"]}
    assert parse_busy(["exit 0"]) == {"checked": True, "busy": False, "reasons": [], "notes": []}
    # The script missing (before its first deploy): nothing is known, nothing defers.
    assert parse_busy(["unchecked"])["checked"] is False
    # A check that failed without saying why still defers, and says that it failed.
    failed = parse_busy(["Error response from daemon: container is restarting", "exit 1"])
    assert failed["busy"] and failed["reasons"] == [
        "the busy check failed: Error response from daemon: container is restarting"
    ]
    fact = ContainerBusy()
    assert "labfleet-busy labfleet-lab-jupyterlab-1 1800" in fact.command("labfleet-lab-jupyterlab-1", 1800)


def test_a_pending_update_runs_the_busy_check_only_while_its_timer_is_armed():
    fact = PendingUpdate()
    command = fact.command("labfleet-update-lab.timer", "labfleet-lab-jupyterlab-1", 60)
    assert command.startswith("systemctl is-enabled --quiet labfleet-update-lab.timer 2>/dev/null || exit 0;")
    assert fact.process([]) == PendingUpdate.default()
    found = fact.process(["armed", "busy: terminal 1 was active 2m ago", "exit 1"])
    assert found["armed"] and found["busy"]["reasons"] == ["terminal 1 was active 2m ago"]


def test_timers_armed_names_each_timer():
    fact = TimersArmed()
    fact.command(("labfleet-update-lab.timer", "labfleet-update-bob.timer"))
    assert fact.process(["armed labfleet-update-bob.timer"]) == {
        "labfleet-update-lab.timer": False,
        "labfleet-update-bob.timer": True,
    }


# --- The deploy's operations ---------------------------------------------------------------------


def _state(**overrides):
    state = {"image_id": "sha256:new", "container_image": "sha256:old", "status": "running", "health": "healthy"}
    state["digest"] = "d1"
    state.update(overrides)
    return state


BUSY = {"checked": True, "busy": True, "reasons": ["kernel 5e2d7c0a (python3) is busy"], "notes": []}
IDLE = {"checked": True, "busy": False, "reasons": [], "notes": []}


def _compose_up(fake_host_in, state, busy, update="when-idle"):
    fake = fake_host_in(jupyter, {jupyter.ComposeService: state, ContainerBusy: busy})
    commands = list(
        jupyter.compose_up._inner(
            "/opt/labfleet/lab", "labfleet-lab", IMAGE, "d1", update=update, idle_seconds=1800, user="lab"
        )
    )
    return commands, fake.noops


def test_a_busy_container_keeps_running_and_the_run_says_why_and_how_to_force(fake_host_in, caplog):
    commands, noops = _compose_up(fake_host_in, _state(), BUSY)
    assert commands == []
    (line,) = noops
    assert line.startswith("JupyterLab of lab keeps running its old container: kernel 5e2d7c0a (python3) is busy.")
    assert "once every kernel and terminal has been idle for 30m" in line and "--data jupyter_update=now" in line
    assert line in caplog.text


@pytest.mark.parametrize(
    ("state", "busy", "update"),
    [
        (_state(), IDLE, "when-idle"),
        (_state(), BUSY, "now"),
        (_state(container_image="sha256:new", digest="d0"), IDLE, "when-idle"),  # other settings, idle
        (_state(status="exited"), BUSY, "when-idle"),  # nothing runs in a stopped container
        (_state(status=None, container_image=None, health=None, digest=None), BUSY, "when-idle"),
    ],
)
def test_an_idle_stopped_or_forced_container_is_brought_up_at_once(fake_host_in, state, busy, update):
    (command,), noops = _compose_up(fake_host_in, state, busy, update)
    assert "docker compose up -d --wait" in command and noops == []


def test_an_update_waits_only_for_a_running_container_on_other_image_or_settings():
    assert updates.waits(_state(), "d1")
    assert updates.waits(_state(container_image="sha256:new"), "d0")
    assert not updates.waits(_state(container_image="sha256:new"), "d1")
    assert not updates.waits(_state(status="exited"), "d1")


@pytest.mark.parametrize(
    ("state", "armed", "expected"),
    [
        (_state(), False, ["systemctl enable --now labfleet-update-lab.timer"]),
        (_state(container_image="sha256:new"), True, ["systemctl disable --now labfleet-update-lab.timer"]),
        (_state(), True, []),
        (_state(container_image="sha256:new"), False, []),
    ],
)
def test_the_update_timer_is_armed_exactly_while_an_update_waits(fake_host_in, state, armed, expected):
    facts = {updates.ComposeService: state, updates.TimersArmed: {"labfleet-update-lab.timer": armed}}
    fake = fake_host_in(updates, facts)
    commands = list(updates.update_timer._inner("labfleet-update-lab.timer", "labfleet-lab", IMAGE, "d1"))
    assert commands == expected
    assert len(fake.noops) == (0 if expected else 1)


def test_the_timer_runs_the_apply_script_with_the_users_project_and_idle_window(settings, monkeypatch):
    monkeypatch.delenv(updates.CHECK_EVERY_ENV, raising=False)
    s = settings(jupyter_update_idle="1h30m")
    files = updates.host_files(s)
    service, _ = files["/etc/systemd/system/labfleet-update-alice.service"]
    assert (
        "ExecStart=/opt/labfleet/updates/labfleet-update /opt/labfleet/alice labfleet-alice-jupyterlab-1 5400 "
        "labfleet-update-alice.timer" in service
    )
    timer, _ = files["/etc/systemd/system/labfleet-update-alice.timer"]
    assert "OnUnitInactiveSec=60\n" in timer
    monkeypatch.setenv(updates.CHECK_EVERY_ENV, "5")
    assert "OnUnitInactiveSec=5\n" in updates.timer_text("alice")
    # The busy check the host runs is this repository's busy_check.py, unchanged.
    assert files[updates.CHECK_FILE][0] == (updates.REPO_ROOT / "labfleet" / "busy_check.py").read_text()
    assert files[updates.BUSY_SCRIPT][1] == "755"


# --- Settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [("30m", 1800), ("90s", 90), ("1h30m", 5400), ("2d", 172800)])
def test_jupyter_update_idle_is_a_duration(raw, value, seconds):
    assert build("pc01", {**raw, "jupyter_update_idle": value}).jupyter_update_idle == seconds
    assert build("pc01", raw).jupyter_update == "when-idle"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("jupyter_update", "later", 'expected one of "when-idle", "now"'),
        ("jupyter_update", True, 'expected one of "when-idle", "now"'),
        ("jupyter_update_idle", "30 minutes", 'expected a duration like "30m", "2h", "1h30m" or "90s"'),
        ("jupyter_update_idle", 1800, 'expected a duration like "30m"'),
    ],
)
def test_bad_update_settings_are_one_line_naming_host_key_and_form(raw, key, value, expected):
    with pytest.raises(SettingsError) as error:
        build("pc07", {**raw, key: value})
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"host pc07: {key} = {value!r} is invalid")
    assert expected in message


# --- Status ------------------------------------------------------------------------------------


def test_status_shows_a_waiting_update_with_its_reason_instead_of_drift():
    from test_report import row, user

    from labfleet import report

    waiting = {**user(config_current=False), "pending": ["kernel 5e2d7c0a (python3) is busy"]}
    stale = {**user(name="bob", config_current=False), "pending": None}
    rows = [row("pc01", users=[waiting, stale])]
    assert report.drift(rows)["pc01"] == ["bob: container runs other settings; run the deploy"]
    (line,) = report.pending_notes(rows)
    assert line == (
        "pc01: lab: update pending (kernel 5e2d7c0a (python3) is busy); it lands by itself once idle, "
        "or now with ./run deploy --data jupyter_update=now"
    )
    armed_idle = {"armed": True, "busy": {"checked": True, "busy": False, "reasons": [], "notes": []}}
    assert report.pending_reasons(armed_idle) == ["idle now; the host's timer applies it at its next check"]
    assert report.pending_reasons(PendingUpdate.default()) is None


def test_the_host_script_hands_the_gpu_processes_and_their_cgroups_to_the_check(tmp_path):
    """labfleet-busy with a stand-in docker and nvidia-smi: what it hands over is what busy_check parses."""
    pid = os.getpid()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # docker: `inspect` answers for a running container; `exec` runs the check here, with the -e values.
    (bin_dir / "docker").write_text(
        f"#!{sys.executable}\n"
        "import os, subprocess, sys\n"
        "args = sys.argv[1:]\n"
        f"if args[0] == 'inspect': print('{CONTAINER_ID} true'); sys.exit(0)\n"
        "env = dict(os.environ)\n"
        "while '-e' in args:\n"
        "    i = args.index('-e'); key, _, value = args[i + 1].partition('='); env[key] = value; del args[i:i + 2]\n"
        "env['JUPYTER_TOKEN_FILE'] = '/nonexistent'\n"
        f"sys.exit(subprocess.run([{sys.executable!r}, '-'], env=env).returncode)\n"
    )
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{pid}, python3'\necho '1, init'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "labfleet-busy"
    script.write_text(
        updates.BUSY_SH.replace(updates.CHECK_FILE, str(updates.REPO_ROOT / "labfleet" / "busy_check.py"))
    )
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run([str(script), "c1", "60"], env=env, capture_output=True, text=True, timeout=60)
    # This test process is not in that container: no GPU process of it (the check also sees this
    # machine's own terminals, so whether it is idle depends on where the tests run).
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert done.stdout.startswith("note: the Jupyter server did not answer")
    assert "busy: GPU process" not in done.stdout
    # What it handed over: each process nvidia-smi lists, with its cgroup lines, in busy_check's format.
    (bin_dir / "docker").write_text(
        (bin_dir / "docker")
        .read_text()
        .replace(
            "env['JUPYTER_TOKEN_FILE']",
            f"open({str(tmp_path / 'apps')!r}, 'w').write(env['LABFLEET_GPU_APPS']); env['JUPYTER_TOKEN_FILE']",
        )
    )
    subprocess.run([str(script), "c1", "60"], env=env, capture_output=True, text=True, timeout=60, check=True)
    apps = busy_check.gpu_apps((tmp_path / "apps").read_text())
    cgroups = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    assert (str(pid), "python3", cgroups) in apps
    assert [app[0] for app in apps] == [str(pid), "1"]


def test_the_timer_keeps_the_containers_own_home_before_it_recreates(tmp_path):
    # The stand-ins record what runs; the busy check says idle, keep-home fails: nothing is recreated.
    bin_dir, project = tmp_path / "bin", tmp_path / "project"
    bin_dir.mkdir()
    project.mkdir()
    for name in ("docker", "systemctl"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {tmp_path}/calls\n')
        (bin_dir / name).chmod(0o755)
    busy = tmp_path / "labfleet-busy"
    busy.write_text("#!/bin/sh\nexit 0\n")
    busy.chmod(0o755)
    (project / "keep-home").write_text(f"#!/bin/sh\necho keep-home >> {tmp_path}/calls\nexit 1\n")
    (project / "keep-home").chmod(0o755)
    script = tmp_path / "labfleet-update"
    script.write_text(updates.APPLY_SH.replace(updates.BUSY_SCRIPT, str(busy)))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    argv = ["sh", str(script), str(project), "labfleet-lab-jupyterlab-1", "60", "labfleet-update-lab.timer"]
    failed = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    assert failed.returncode == 1
    assert (tmp_path / "calls").read_text().splitlines() == ["keep-home"], "a failed copy recreates nothing"
    (project / "keep-home").write_text(f"#!/bin/sh\necho keep-home >> {tmp_path}/calls\n")
    (tmp_path / "calls").unlink()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "keep-home" and calls[1].startswith("docker compose up -d --wait")
    assert calls[2] == "systemctl disable --now labfleet-update-lab.timer"
