"""Facts about who uses a host's GPUs: nvidia-smi's report, each compute process's cgroup, the
containers those cgroups name and the kernels of the Jupyter servers in them (labfleet.gpu_usage).

nvidia-smi on the host lists host PIDs, not people, and inside a container it lists no process
at all. The host's /proc/<pid>/cgroup names the container a process runs in (Docker names the
container's cgroup after its id under every driver), the container's compose project label names
the labfleet user, and the user's Jupyter server says which kernel the process is and when it was
last active. All of it is read in one command, which costs nothing beyond ``command -v`` on a host
without nvidia-smi.
"""

from __future__ import annotations

import re
import shlex
from typing import TypedDict

from pyinfra.api import FactBase

from labfleet.busy_check import parse_time

QUERY_GPU = "index,uuid,name,utilization.gpu,memory.used,memory.total,temperature.gpu"
QUERY_APPS = "gpu_uuid,pid,used_memory"
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"

# What nvidia-smi prints where a value is unknown to it or unsupported by the GPU.
UNKNOWN_VALUES = ("[N/A]", "N/A", "[Not Supported]", "[Unknown Error]", "[Insufficient Permissions]", "")

# Run by the container's own python3: the kernels its Jupyter server has, asked with the token
# the server itself read (labfleet mounts it and names it in JUPYTER_TOKEN_FILE).
KERNELS_PY = """\
import json, os, urllib.request
token = open(os.environ["JUPYTER_TOKEN_FILE"]).read().strip()
request = urllib.request.Request("http://127.0.0.1:8888/api/kernels", headers={"Authorization": "token " + token})
for k in json.load(urllib.request.urlopen(request, timeout=10)):
    print("kernel", k.get("id"), k.get("execution_state"), k.get("last_activity"), k.get("connections"))
"""

_CONTAINER_ID = re.compile(r"^[0-9a-f]{64}$")
_KERNEL_FILE = re.compile(r"kernel-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.json")


class Gpu(TypedDict):
    index: int | None
    uuid: str
    name: str
    utilization: int | None  # percent
    memory_used: int | None  # MiB
    memory_total: int | None  # MiB
    temperature: int | None  # degrees C


class GpuProcess(TypedDict):
    gpu_uuid: str
    pid: int
    memory: int | None  # MiB
    cgroup: list[str]  # the lines of its /proc/<pid>/cgroup; empty when it could not be read
    command: str
    owner: str | None  # the host account it runs as


class Container(TypedDict):
    id: str
    name: str
    project: str | None


class Kernel(TypedDict):
    id: str
    state: str | None
    last_activity: float | None  # seconds since the epoch
    connections: int | None


class GpuUsageState(TypedDict):
    smi: bool  # the host has nvidia-smi
    error: str | None  # what nvidia-smi printed instead of its report
    now: int | None  # the host's clock, for the kernels' idle times
    gpus: list[Gpu]
    processes: list[GpuProcess]
    containers: list[Container]
    kernels: dict[str, list[Kernel]]  # by container id


def number(text: str) -> int | None:
    """A value of nvidia-smi's csv (``nounits``), or None for "[N/A]" and its relatives."""
    text = text.strip()
    for unit in (" %", " MiB", " C"):
        text = text.removesuffix(unit)
    if text in UNKNOWN_VALUES:
        return None
    try:
        return round(float(text))
    except ValueError:
        return None


def parse_gpu_line(line: str) -> Gpu | None:
    """One line of ``--query-gpu=QUERY_GPU --format=csv,noheader,nounits``; None if it is not one."""
    fields = [field.strip() for field in line.split(",")]
    if len(fields) < 7 or not fields[1].startswith("GPU-"):
        return None
    index = number(fields[0])
    return Gpu(
        index=index,
        uuid=fields[1],
        # A model name never had a comma so far; if one does, it keeps it.
        name=", ".join(fields[2:-4]),
        utilization=number(fields[-4]),
        memory_used=number(fields[-3]),
        memory_total=number(fields[-2]),
        temperature=number(fields[-1]),
    )


def parse_app_line(line: str) -> tuple[str, int, int | None] | None:
    """(gpu uuid, pid, MiB) from a line of ``--query-compute-apps=QUERY_APPS``; None if it is not one.

    Without compute processes nvidia-smi prints nothing here, or, in some versions and in its
    table view, "No running processes found": neither is a process.
    """
    fields = [field.strip() for field in line.split(",")]
    if len(fields) != 3 or not fields[1].isdigit():
        return None
    return fields[0], int(fields[1]), number(fields[2])


def container_ids(cgroup_lines: list[str]) -> list[str]:
    """The full container ids a process's /proc/<pid>/cgroup names, outermost first.

    Docker names a container's cgroup after its id: ``/docker/<id>`` with the cgroupfs driver
    (cgroup v1 and v2), ``/system.slice/docker-<id>.scope`` with the systemd driver, under
    every v1 controller (``12:pids:/docker/<id>``) or the one v2 line (``0::/...``). A Docker
    engine that runs inside a container nests them: ``/docker/<outer>/docker/<inner>``.
    """
    found: list[str] = []
    for line in cgroup_lines:
        path = line.strip().split(":", 2)[-1]
        for part in path.split("/"):
            name = part.removeprefix("docker-").removesuffix(".scope")
            if _CONTAINER_ID.match(name) and name not in found:
                found.append(name)
    return found


def kernel_id(command: str) -> str | None:
    """The Jupyter kernel id of a process, from its command line (``... -f .../kernel-<id>.json``)."""
    found = _KERNEL_FILE.search(command)
    return found.group(1) if found else None


def parse_kernel_line(words: list[str]) -> tuple[str, Kernel] | None:
    """(container id, kernel) from ``kernel <container> <id> <state> <last_activity> <connections>``."""
    if len(words) != 6:
        return None
    _, container, kid, state, last, connections = words
    return container, Kernel(
        id=kid,
        state=None if state == "None" else state,
        last_activity=parse_time(last),
        connections=int(connections) if connections.isdigit() else None,
    )


def parse_gpu_usage(lines) -> GpuUsageState:
    """GpuUsage's output, parsed: every line names what it carries in its first word."""
    state = GpuUsage.default()
    said: list[str] = []
    failed = False
    apps: list[tuple[str, int, int | None]] = []
    cgroups: dict[int, list[str]] = {}
    commands: dict[int, str] = {}
    owners: dict[int, str] = {}
    for raw in lines:
        line = raw.rstrip("\n")
        kind, _, rest = line.partition(" ")
        if kind == "nvidia-smi":
            state["smi"] = True
        elif kind == "now" and rest.strip().isdigit():
            state["now"] = int(rest)
        elif kind == "gpu-rc":
            failed = rest.strip() != "0"
        elif kind == "gpu":
            gpu = parse_gpu_line(rest)
            if gpu is None:
                if rest.strip():
                    said.append(rest.strip())
            else:
                state["gpus"].append(gpu)
        elif kind == "app":
            app = parse_app_line(rest)
            if app is not None:
                apps.append(app)
        elif kind in ("cgroup", "cmd", "owner"):
            pid_text, _, value = rest.partition(" ")
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if kind == "cgroup":
                cgroups.setdefault(pid, []).append(value)
            elif kind == "cmd":
                commands[pid] = value.strip()
            else:
                owners[pid] = value.strip()
        elif kind == "container":
            words = rest.split()
            if words and _CONTAINER_ID.match(words[0]):
                name = words[1] if len(words) > 1 else ""
                project = words[2] if len(words) > 2 else None
                state["containers"].append(Container(id=words[0], name=name, project=project))
        elif kind == "kernel":
            found = parse_kernel_line(line.split())
            if found is not None:
                state["kernels"].setdefault(found[0], []).append(found[1])
    for uuid, pid, memory in apps:
        state["processes"].append(
            GpuProcess(
                gpu_uuid=uuid,
                pid=pid,
                memory=memory,
                cgroup=cgroups.get(pid, []),
                command=commands.get(pid, ""),
                owner=owners.get(pid),
            )
        )
    if said or (failed and not state["gpus"]):
        # "Failed to initialize NVML: Driver/library version mismatch" and the like.
        state["error"] = said[0] if said else "nvidia-smi failed and printed nothing"
    return state


class GpuUsage(FactBase[GpuUsageState]):
    """Each GPU's model, load, memory and temperature, and every compute process on it with its
    cgroup, command line and owner; the running containers; the Jupyter kernels of the containers
    that hold a GPU process.

    Returns a ``GpuUsageState``; ``smi`` is False (and everything empty) where there is no
    nvidia-smi. Attribution to users is labfleet.gpu_usage's, from this state.
    """

    @staticmethod
    def default() -> GpuUsageState:
        return GpuUsageState(smi=False, error=None, now=None, gpus=[], processes=[], containers=[], kernels={})

    def command(self) -> str:
        kernels = shlex.quote(KERNELS_PY)
        containers = shlex.quote(f'{{{{.ID}}}} {{{{.Names}}}} {{{{.Label "{COMPOSE_PROJECT_LABEL}"}}}}')
        return (
            "command -v nvidia-smi >/dev/null 2>&1 || exit 0; echo nvidia-smi; "
            'echo "now $(date +%s)"; '
            f"out=$(timeout 20 nvidia-smi --query-gpu={QUERY_GPU} --format=csv,noheader,nounits 2>&1); "
            'echo "gpu-rc $?"; printf "%s\\n" "$out" | sed "s/^/gpu /"; '
            f"apps=$(timeout 20 nvidia-smi --query-compute-apps={QUERY_APPS} --format=csv,noheader,nounits 2>&1); "
            'printf "%s\\n" "$apps" | sed "s/^/app /"; '
            "procs=; "
            "for pid in $(printf '%s\\n' \"$apps\" | cut -s -d, -f2 | tr -dc '0-9\\n' | sort -u); do "
            '[ -r "/proc/$pid/cgroup" ] || continue; '
            'procs="$procs$(sed "s/^/cgroup $pid /" "/proc/$pid/cgroup")\n'
            "cmd $pid $(tr '\\0' ' ' < \"/proc/$pid/cmdline\" | cut -c1-400)\n"
            'owner $pid $(stat -c %U "/proc/$pid")\n"; '
            "done; "
            'printf "%s" "$procs"; '
            '[ -n "$procs" ] && command -v docker >/dev/null 2>&1 || exit 0; '
            f"docker ps --no-trunc --format {containers} 2>/dev/null | "
            "while read -r id name project; do "
            'echo "container $id $name $project"; '
            'case "$procs" in *"$id"*) ;; *) continue ;; esac; '
            'case "$procs" in *kernel-*) ;; *) continue ;; esac; '
            f'timeout 20 docker exec "$id" python3 -c {kernels} 2>/dev/null </dev/null | '
            'sed "s/^kernel /kernel $id /"; '
            "done; true"
        )

    def process(self, output):
        return parse_gpu_usage(output)
