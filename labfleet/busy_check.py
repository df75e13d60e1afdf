"""Is this JupyterLab container doing work that a recreate would kill? The one busy check.

labfleet uploads this file to /opt/labfleet/updates/ on each host, and the host's
``labfleet-busy`` script runs it with the container's own python3 (``docker exec -i
<container> python3 - < busy_check.py``): the server is asked from inside the container, with
the token the server itself read, so nothing depends on the published port or address. The
deploy (before it recreates a container), the host's update timer (before it applies a pending
update) and the status all run that same script.

It prints one ``busy: ...`` line for each thing that must not be interrupted, ``note: ...``
lines for what it could not tell, and exits 1 while something is busy, 0 when the container
may be recreated. Busy means:

- a kernel that is running code (execution_state ``busy``, or still ``starting``), or one
  whose last activity is less than the idle window ago;
- a terminal active within the idle window, or one in which a command runs: any process of the
  container with a controlling terminal that is not its session's leader (the shell a terminal
  starts leads its session; what it runs does not, and neither does a ``nohup ... &`` job);
  the server's own last_activity of a terminal moves only while a browser tab shows it;
- a GPU compute process (nvidia-smi on the host) whose cgroup is this container's.

Inputs, from the environment that ``labfleet-busy`` passes: LABFLEET_IDLE_SECONDS, the idle
window; LABFLEET_CONTAINER_ID, the container's full id; LABFLEET_GPU_APPS, the host's report:
for each compute process, an ``app <pid>, <process name>`` line (as nvidia-smi's csv prints it)
followed by ``cgroup <line>`` for each line of its /proc/<pid>/cgroup. Standard library only:
it runs in whatever Python the image has.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone

API = "http://127.0.0.1:8888/api"
TOKEN_ENV = "JUPYTER_TOKEN_FILE"
RUNNING_STATES = ("busy", "starting")


def duration_text(seconds: float) -> str:
    """A short human duration: 45s, 12m, 2h05m, 3d04h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def parse_time(text: object) -> float | None:
    """Seconds since the epoch of an ISO 8601 time as Jupyter writes it ("2026-12-02T09:10:11.123456Z")."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def kernel_reasons(kernels: list, now: float, idle_seconds: int) -> list[str]:
    """What /api/kernels shows running: busy kernels, and kernels active within the idle window."""
    reasons = []
    for kernel in kernels:
        if not isinstance(kernel, dict):
            continue
        name = f"kernel {str(kernel.get('id', '?'))[:8]} ({kernel.get('name', '?')})"
        state = kernel.get("execution_state")
        if state in RUNNING_STATES:
            reasons.append(f"{name} is {state}")
            continue
        last = parse_time(kernel.get("last_activity"))
        if last is None:
            reasons.append(f"{name} has no known last activity")
        elif now - last < idle_seconds:
            ago = duration_text(now - last)
            wait = duration_text(idle_seconds - (now - last))
            reasons.append(f"{name} was active {ago} ago (idle for {wait} more)")
    return reasons


def terminal_reasons(terminals: list, now: float, idle_seconds: int) -> list[str]:
    """The terminals of /api/terminals that were active within the idle window."""
    reasons = []
    for terminal in terminals:
        if not isinstance(terminal, dict):
            continue
        last = parse_time(terminal.get("last_activity"))
        if last is not None and now - last < idle_seconds:
            reasons.append(f"terminal {terminal.get('name', '?')} was active {duration_text(now - last)} ago")
    return reasons


def terminal_commands(stats: list[str]) -> list[str]:
    """The commands that run in a terminal, from the lines of the container's /proc/<pid>/stat.

    A process with a controlling terminal (tty_nr not 0) that does not lead its session: the
    shells of JupyterLab's terminals (and of a `docker exec -it`) lead theirs. The server and
    its kernels have no terminal at all.
    """
    found = []
    for line in stats:
        head, _, rest = line.rpartition(")")
        pid, _, comm = head.partition(" (")
        fields = rest.split()
        if len(fields) < 5 or not pid.strip().isdigit():
            continue
        session, tty = fields[3], fields[4]
        if tty != "0" and session != pid.strip():
            found.append(f"{comm} (pid {pid.strip()}) runs in a terminal")
    return found


def _process_stats() -> list[str]:
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    stats.append(file.read())
            except OSError:
                pass  # it ended meanwhile
    return stats


def gpu_apps(report: str) -> list[tuple[str, str, list[str]]]:
    """(pid, process name, cgroup lines) for each compute process in the host's report."""
    apps: list[tuple[str, str, list[str]]] = []
    for line in report.splitlines():
        if line.startswith("app "):
            pid, _, name = line[4:].partition(",")
            apps.append((pid.strip(), name.strip() or "?", []))
        elif line.startswith("cgroup ") and apps:
            apps[-1][2].append(line[7:])
    return apps


def in_container(cgroup_lines: list[str], container_id: str) -> bool:
    """Whether a process's /proc/<pid>/cgroup places it in the container with this full id.

    Docker names the container's cgroup after its id under every layout: cgroup v1
    (``/docker/<id>``), v2 with systemd (``/system.slice/docker-<id>.scope``) or cgroupfs
    (``/docker/<id>``), and nested engines, where the path has a prefix.
    """
    if len(container_id) < 12:
        return False
    for line in cgroup_lines:
        path = line.split(":", 2)[-1]
        for part in path.split("/"):
            name = part.removeprefix("docker-").removesuffix(".scope")
            if name == container_id:
                return True
    return False


def gpu_reasons(report: str, container_id: str) -> list[str]:
    """The GPU compute processes of the report that run in this container."""
    return [
        f"GPU process {pid} ({name}) is running"
        for pid, name, cgroups in gpu_apps(report)
        if in_container(cgroups, container_id)
    ]


def _get(path: str, token: str) -> list:
    request = urllib.request.Request(f"{API}{path}", headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        found = json.load(answer)
    return found if isinstance(found, list) else []


def server_reasons(now: float, idle_seconds: int) -> tuple[list[str], list[str]]:
    """(busy reasons, notes) from this container's Jupyter server."""
    try:
        with open(os.environ[TOKEN_ENV]) as file:
            token = file.read().strip()
        kernels = _get("/kernels", token)
        terminals = _get("/terminals", token)
    except (KeyError, OSError, ValueError, urllib.error.URLError) as error:
        # A server that does not answer runs no notebook a person could lose; an update may
        # well be what mends it. GPU processes are still checked.
        return [], [f"the Jupyter server did not answer ({error}); kernels and terminals unknown"]
    return kernel_reasons(kernels, now, idle_seconds) + terminal_reasons(terminals, now, idle_seconds), []


def main() -> int:
    idle_seconds = int(os.environ.get("LABFLEET_IDLE_SECONDS", "0"))
    now = datetime.now(timezone.utc).timestamp()
    busy, notes = server_reasons(now, idle_seconds)
    busy += terminal_commands(_process_stats())
    busy += gpu_reasons(os.environ.get("LABFLEET_GPU_APPS", ""), os.environ.get("LABFLEET_CONTAINER_ID", ""))
    for note in notes:
        print(f"note: {note}")
    for reason in busy:
        print(f"busy: {reason}")
    return 1 if busy else 0


if __name__ == "__main__":
    sys.exit(main())
