"""Updates that wait for work to finish: a running container is recreated only once it is idle.

With ``jupyter_update = "when-idle"`` (the default), the deploy asks the host, before it
recreates a running JupyterLab container, whether anything in it is busy (labfleet/busy_check.py:
kernels, terminals, GPU processes). While something is, the old container keeps running: the
new image and files are already staged, the deploy prints why it waits, and it arms a per-user
systemd timer on the host. Every minute the timer runs the same busy check; once the container
is idle it runs ``docker compose up -d --wait`` in the project directory and disarms itself, so
the next deploy finds nothing to do. ``jupyter_update = "now"`` recreates at once.

Files on each host (always present, so a deferral only arms a timer):

- /opt/labfleet/updates/labfleet-busy and busy_check.py: the busy check (exit 0 idle, 1 busy);
- /opt/labfleet/updates/labfleet-update: what the timer runs;
- /etc/systemd/system/labfleet-update-<user>.service and .timer, enabled only while an update waits.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import operation

from labfleet import compose, snapshot_files
from labfleet.busy_check import duration_text
from labfleet.facts.jupyter import ComposeService, ComposeState
from labfleet.facts.system import PathState, PathStates
from labfleet.facts.updates import BUSY_SCRIPT, UPDATES_DIR, TimersArmed
from labfleet.planning import Read, snapshot, unless_current
from labfleet.settings import REPO_ROOT, Settings

CHECK_FILE = f"{UPDATES_DIR}/busy_check.py"
APPLY_SCRIPT = f"{UPDATES_DIR}/labfleet-update"
UNIT_DIR = "/etc/systemd/system"
# How often an armed timer checks; tests make it shorter (an internal knob, not a setting).
CHECK_EVERY_ENV = "LABFLEET_UPDATE_CHECK_SECONDS"
FORCE_HINT = "--data jupyter_update=now"

BUSY_SH = f"""\
#!/bin/sh
# labfleet-busy CONTAINER IDLE_SECONDS (written by labfleet): may this JupyterLab container be
# recreated? Prints a "busy: ..." line for each kernel, terminal or GPU process that would be
# interrupted, and exits 1 while there is one, 0 when it is idle. The decision is busy_check.py's,
# run by the container's own python3; this script adds what only the host sees: the GPU compute
# processes (nvidia-smi) and their cgroups, which name the container they run in.
set -u
container=$1
idle=$2
state=$(docker inspect --format '{{{{.Id}}}} {{{{.State.Running}}}}' "$container" 2>/dev/null) || {{
  echo "note: no container $container"; exit 0; }}
id=${{state% *}}
[ "${{state#* }}" = true ] || {{ echo "note: $container is not running"; exit 0; }}
gpu=
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu=$(timeout 20 nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader 2>/dev/null |
    while IFS=, read -r pid name; do
      pid=$(printf %s "$pid" | tr -dc 0-9)
      [ -n "$pid" ] && [ -r "/proc/$pid/cgroup" ] || continue
      echo "app $pid,$name"
      sed 's/^/cgroup /' "/proc/$pid/cgroup"
    done)
fi
# A server that hangs must not hang the deploy: after a minute the check fails, which defers.
exec timeout 60 docker exec -i \\
  -e LABFLEET_IDLE_SECONDS="$idle" -e LABFLEET_CONTAINER_ID="$id" -e LABFLEET_GPU_APPS="$gpu" \\
  "$container" python3 - < {CHECK_FILE}
"""

APPLY_SH = f"""\
#!/bin/sh
# labfleet-update PROJECT_DIR CONTAINER IDLE_SECONDS TIMER (written by labfleet): run by TIMER
# while an update of a JupyterLab project waits. Once the container is idle, the staged
# project is brought up (which recreates the container) and the timer disarms itself.
set -u
directory=$1
container=$2
idle=$3
timer=$4
if ! {BUSY_SCRIPT} "$container" "$idle"; then
  echo "labfleet: the update of $directory waits for the work above to finish"
  exit 0
fi
cd "$directory" || exit 1
# A container from before home_dir: its own HOME is copied out first (labfleet.jupyter.keep_home_script).
if [ -x ./{compose.KEEP_HOME} ]; then ./{compose.KEEP_HOME} || exit 1; fi
docker compose up -d --wait --wait-timeout 300 || exit 1
echo "labfleet: $container updated; disarming $timer"
systemctl disable --now "$timer"
"""


def check_every_seconds() -> int:
    """How often an armed timer checks: a minute keeps the host quiet and the wait short."""
    value = os.environ.get(CHECK_EVERY_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else 60


def timer_name(user: str) -> str:
    return f"labfleet-update-{user}.timer"


def service_text(settings: Settings, user: str) -> str:
    project = compose.project_name(user)
    args = [
        APPLY_SCRIPT,
        compose.project_directory(user),
        compose.container_name(project),
        str(settings.jupyter_update_idle),
        timer_name(user),
    ]
    return (
        "[Unit]\n"
        f"Description=labfleet: apply the waiting JupyterLab update of {user} once it is idle\n"
        "After=docker.service\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"ExecStart={' '.join(shlex.quote(arg) for arg in args)}\n"
    )


def timer_text(user: str) -> str:
    every = check_every_seconds()
    return (
        "[Unit]\n"
        f"Description=labfleet: check every {every} s whether the JupyterLab of {user} is idle for its update\n\n"
        "[Timer]\n"
        f"OnActiveSec={every}\n"
        f"OnUnitInactiveSec={every}\n"
        "AccuracySec=1\n\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )


def _check_source() -> str:
    return (REPO_ROOT / "labfleet" / "busy_check.py").read_text()


def host_files(settings: Settings) -> dict[str, tuple[str, str]]:
    """Every file this module keeps on a host: path -> (text, mode)."""
    out = {
        BUSY_SCRIPT: (BUSY_SH, "755"),
        CHECK_FILE: (_check_source(), "644"),
        APPLY_SCRIPT: (APPLY_SH, "755"),
    }
    for user in settings.jupyter_users:
        unit = f"{UNIT_DIR}/labfleet-update-{user.name}"
        out[f"{unit}.service"] = (service_text(settings, user.name), "644")
        out[f"{unit}.timer"] = (timer_text(user.name), "644")
    return out


def reads(settings: Settings) -> dict[str, Read]:
    """What the update machinery is decided from: its files, and each user's timer."""
    paths = tuple(host_files(settings))
    return {
        "paths": Read(PathStates, {"paths": (UPDATES_DIR, *paths), "digests": paths}),
        "timers": Read(TimersArmed, {"timers": tuple(timer_name(user.name) for user in settings.jupyter_users)}),
    }


@dataclass(frozen=True)
class UpdatesState:
    paths: dict[str, PathState]
    timers: dict[str, bool]


def install_update_timers(settings: Settings) -> None:
    """Keep the busy check, the apply script and each user's (disarmed) timer units on the host."""
    state = snapshot(UpdatesState, reads(settings))
    snapshot_files.directory(state.paths, f"Create {UPDATES_DIR}", UPDATES_DIR, "root", "root", "755")
    units = {}
    for path, (text, mode) in host_files(settings).items():
        if path.startswith(UNIT_DIR):
            units[path] = text
        else:
            snapshot_files.text_file(state.paths, f"Write {path}", text, path, "root", "root", mode)
    snapshot_files.systemd_units(state.paths, units, "Reload systemd for the update timers")


def waits(state: ComposeState, digest: str) -> bool:
    """A running container on another image or other settings than the project's: an update waits for it."""
    return state["status"] == "running" and (state["container_image"] != state["image_id"] or state["digest"] != digest)


@operation(is_idempotent=True)
def update_timer(timer: str, project: str, image: str, digest: str):
    """Arm the update timer while an update of the project waits, disarm it once none does.

    + timer: the project's update timer unit
    + project: the compose project name
    + image: the image tag the project runs
    + digest: the config digest of the project's current settings

    **Example:**

    .. code:: python

        update_timer(name="Update timer of lab", timer="labfleet-update-lab.timer",
                     project="labfleet-lab", image="labfleet/jupyterlab:jupyter-0123456789ab", digest="d1")
    """
    waiting = waits(host.get_fact(ComposeService, project=project, image=image), digest)
    armed = host.get_fact(TimersArmed, timers=(timer,)).get(timer, False)
    if waiting and not armed:
        yield f"systemctl enable --now {shlex.quote(timer)}"
    elif armed and not waiting:
        yield f"systemctl disable --now {shlex.quote(timer)}"
    else:
        host.noop(f"{timer} is {'armed: an update waits' if armed else 'disarmed: no update waits'}")


def plan_update_timer(settings: Settings, user: str, service: ComposeState, digest: str, image: str) -> None:
    state = snapshot(UpdatesState, reads(settings))
    timer = timer_name(user)
    unless_current(
        update_timer,
        current=waits(service, digest) == state.timers.get(timer, False),
        name=f"Update timer of {user}",
        timer=timer,
        project=compose.project_name(user),
        image=image,
        digest=digest,
    )


def deferral_line(user: str, reasons: list[str], idle_seconds: int) -> str:
    """The line a run prints for a user whose update waits: what is busy, and how to force it."""
    return (
        f"JupyterLab of {user} keeps running its old container: {'; '.join(reasons)}. "
        f"The update is staged and lands by itself once every kernel and terminal has been idle for "
        f"{duration_text(idle_seconds)}; to recreate it now, run the deploy with {FORCE_HINT}"
    )
