"""Who uses which GPU: each compute process attributed to a lab user, idle kernels marked.

The fact (labfleet/facts/gpu_usage.py) reads what the host knows; this module decides:

- a process belongs to the labfleet user whose container's cgroup holds it: the container's
  compose project is ``labfleet-<user>`` (labfleet.compose.project_name). A container of another
  compose project shows as that project, one without a project by its name, and a process
  outside any container by its host account;
- a process that is a Jupyter kernel (its command line names ``kernel-<id>.json``) shows how long
  its kernel has been idle, by the ``last_activity`` that the user's own Jupyter server reports
  for it: the same clock the server's culler uses, so "idle past jupyter_cull_idle" means what
  the culler would act on. A kernel running a cell is not idle, and neither is one that no client
  has used since it started (its server still says "starting"). Past ``jupyter_cull_idle`` it is
  marked: it should have been culled (the container still runs older settings, or culling is
  off on it) and holds GPU memory meanwhile. With ``"off"`` nothing is marked, the idle time
  is still shown.

Memory is in MiB, as nvidia-smi reports it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict

from labfleet.busy_check import duration_text
from labfleet.compose import PROJECT_PREFIX
from labfleet.facts.gpu_usage import GpuProcess, GpuUsageState, Kernel, container_ids, kernel_id


class ProcessUse(TypedDict):
    pid: int
    memory: int | None  # MiB
    kernel: str | None  # the Jupyter kernel id, when the process is a kernel
    kernel_state: str | None  # what its server says: idle, busy, starting (None: unknown)
    idle_seconds: int | None  # how long that kernel has been idle (None: busy, or not a kernel)
    idle_past_cull: bool


class UserUse(TypedDict):
    user: str  # a lab user; or "project X", "container X", "host account X", "pid N"
    lab_user: bool
    memory: int | None  # MiB, summed over the user's processes on this GPU
    processes: list[ProcessUse]


class GpuUse(TypedDict):
    index: int | None
    uuid: str
    name: str
    utilization: int | None
    memory_used: int | None
    memory_total: int | None
    temperature: int | None
    users: list[UserUse]


class HostGpuUse(TypedDict):
    error: str | None  # nvidia-smi's own words when it gave no report
    cull_seconds: int  # jupyter_cull_idle (0: off)
    gpus: list[GpuUse]


def _owner(process: GpuProcess, containers: dict[str, tuple[str, str | None]]) -> tuple[str, bool]:
    """(who, whether that is a lab user) for one process."""
    if not process["cgroup"]:
        return f"pid {process['pid']}", False  # ended meanwhile, or in a PID namespace we do not see
    for cid in container_ids(process["cgroup"]):
        if cid in containers:
            name, project = containers[cid]
            if project and project.startswith(PROJECT_PREFIX):
                return project.removeprefix(PROJECT_PREFIX), True
            if project:
                return f"project {project}", False
            return f"container {name or cid[:12]}", False
    return f"host account {process['owner'] or '?'}", False


def _kernel_use(process: GpuProcess, kernels: Iterable[Kernel], now: int | None, cull_seconds: int) -> ProcessUse:
    use = ProcessUse(
        pid=process["pid"],
        memory=process["memory"],
        kernel=kernel_id(process["command"]),
        kernel_state=None,
        idle_seconds=None,
        idle_past_cull=False,
    )
    for kernel in kernels:
        if kernel["id"] == use["kernel"]:
            use["kernel_state"] = kernel["state"]
            last = kernel["last_activity"]
            if kernel["state"] == "idle" and last is not None and now is not None:
                idle = max(0, int(now - last))
                use["idle_seconds"] = idle
                use["idle_past_cull"] = bool(cull_seconds) and idle >= cull_seconds
    return use


def _sum(values: Iterable[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None


def host_gpu_use(state: GpuUsageState, cull_seconds: int) -> HostGpuUse | None:
    """Each GPU of the host with its users, from the GpuUsage fact (None: no nvidia-smi there).

    + cull_seconds: jupyter_cull_idle (0: off); kernels idle at least this long are marked
    """
    if not state["smi"]:
        return None
    containers = {c["id"]: (c["name"], c["project"]) for c in state["containers"]}
    gpus: list[GpuUse] = []
    for gpu in sorted(state["gpus"], key=lambda g: (g["index"] is None, g["index"] or 0)):
        users: dict[str, UserUse] = {}
        for process in state["processes"]:
            if process["gpu_uuid"] != gpu["uuid"]:
                continue
            who, lab_user = _owner(process, containers)
            kernels: list[Kernel] = []
            for cid in container_ids(process["cgroup"]):
                kernels += state["kernels"].get(cid, [])
            use = users.setdefault(who, UserUse(user=who, lab_user=lab_user, memory=None, processes=[]))
            use["processes"].append(_kernel_use(process, kernels, state["now"], cull_seconds))
        for use in users.values():
            use["memory"] = _sum(p["memory"] for p in use["processes"])
        ordered = sorted(users.values(), key=lambda u: (not u["lab_user"], -(u["memory"] or 0), u["user"]))
        gpus.append(
            GpuUse(
                index=gpu["index"],
                uuid=gpu["uuid"],
                name=gpu["name"],
                utilization=gpu["utilization"],
                memory_used=gpu["memory_used"],
                memory_total=gpu["memory_total"],
                temperature=gpu["temperature"],
                users=ordered,
            )
        )
    return HostGpuUse(error=state["error"], cull_seconds=cull_seconds, gpus=gpus)


def gib(mib: int | None) -> str:
    return "?" if mib is None else f"{mib / 1024:.1f}G"


def _user_cell(use: UserUse) -> str:
    text = f"{use['user']} {gib(use['memory'])}"
    for process in use["processes"]:
        kernel = (process["kernel"] or "?")[:8]
        if process["idle_seconds"] is not None:
            mark = "!" if process["idle_past_cull"] else ""
            text += f" ({mark}kernel {kernel} idle {duration_text(process['idle_seconds'])})"
        elif process["kernel_state"]:
            text += f" (kernel {kernel} {process['kernel_state']})"
    return text


GPU_HEADER = ("", "host", "gpu", "model", "util", "memory", "temp", "users")


def gpu_lines(hosts: Iterable[tuple[str, HostGpuUse | None]]) -> list[str]:
    """The GPU section of the status: a line per GPU, ``!`` on those with a kernel idle past the cull."""
    lines: list[tuple[str, ...]] = [GPU_HEADER]
    for host, use in hosts:
        if use is None:
            continue
        if use["error"] and not use["gpus"]:
            lines.append(("!", host, "-", f"nvidia-smi: {use['error']}", "", "", "", ""))
            continue
        for gpu in use["gpus"]:
            marked = any(p["idle_past_cull"] for u in gpu["users"] for p in u["processes"])
            util = "?" if gpu["utilization"] is None else f"{gpu['utilization']}%"
            memory = f"{gib(gpu['memory_used'])}/{gib(gpu['memory_total'])}"
            temp = "?" if gpu["temperature"] is None else f"{gpu['temperature']}C"
            users = ", ".join(_user_cell(u) for u in gpu["users"]) or "-"
            index = "?" if gpu["index"] is None else str(gpu["index"])
            lines.append(("!" if marked else " ", host, index, gpu["name"], util, memory, temp, users))
    if len(lines) == 1:
        return []
    widths = [max(len(line[i]) for line in lines) for i in range(len(GPU_HEADER))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]


def idle_notes(hosts: Iterable[tuple[str, HostGpuUse | None]]) -> list[str]:
    """One line per kernel idle past jupyter_cull_idle that holds GPU memory: whose, how long, what to do."""
    out = []
    for host, use in hosts:
        if use is None:
            continue
        for gpu in use["gpus"]:
            for user in gpu["users"]:
                for process in user["processes"]:
                    if process["idle_past_cull"] and process["idle_seconds"] is not None:
                        kernel = (process["kernel"] or "?")[:8]
                        out.append(
                            f"{host}: GPU {gpu['index']}: {user['user']}'s kernel {kernel} has been "
                            f"idle {duration_text(process['idle_seconds'])} (past jupyter_cull_idle, "
                            f"{duration_text(use['cull_seconds'])}) "
                            f"and holds {gib(process['memory'])}; shut it down in JupyterLab, or deploy so that the "
                            "server culls it"
                        )
    return out
