"""NVIDIA's runtime in Docker: daemon.json's keys, dockerd aware of the hook, the CDI spec, the default runtime.

deploy.py calls it twice, around the docker step (labfleet.nvidia installs the toolkit before it):

- ``daemon_keys`` and ``daemon_keys_to_drop``: the docker step merges them into daemon.json in
  its one write and one restart. NVIDIA's runtime is registered in daemon.json by merge;
  ``nvidia-ctk runtime configure`` would rewrite the file. ``nvidia_default_runtime`` turned
  off removes only a ``default-runtime`` that labfleet wrote (a marker file tells it from one
  set by hand), and dockerd restarts for it: a reload keeps a key the file no longer sets.
- ``configure_container_runtime``, after the docker step: restarts dockerd when it is still the
  one that started before this run installed the toolkit (dockerd registers its ``nvidia`` GPU
  driver, what ``--gpus`` and compose's ``driver: nvidia`` use, only when it starts and finds
  nvidia-container-runtime-hook on its PATH; an engine that was already configured has no
  daemon.json change to restart for), keeps the CDI spec current, and records whether labfleet
  made nvidia the default runtime.

"Failed to initialize NVML: Unknown Error" after ``systemctl daemon-reload``: with
Docker's systemd cgroup driver (its default on cgroup v2, so on every supported
release), systemd re-applies a container's device rules on a reload and drops the GPU
devices that NVIDIA's hook added behind its back. Two fixes exist: CDI, where the
devices are in the container's OCI spec, or Docker's cgroupfs driver, where systemd
does not manage the container's cgroup at all. labfleet sets
``exec-opts: ["native.cgroupdriver=cgroupfs"]`` (other exec-opts are kept) because it
fixes every way a GPU is asked for on every engine labfleet installs: ``--gpus`` and
compose's ``driver: nvidia`` go through the hook, not CDI, on Docker before 28.x
(Debian 13's docker.io is 26.1), and CDI devices need ``features.cdi`` there. A
``docker_daemon`` that sets its own ``exec-opts`` wins, knowingly.

The CDI spec lists the driver's libraries by version and the toolkit's hooks by path, so
it must follow both: from Docker 29.2, ``--gpus`` and compose's ``driver: nvidia`` become
CDI requests whenever nvidia-cdi-hook is on dockerd's PATH (moby#50228), and a stale spec
then stops every GPU container. Before toolkit 1.18 labfleet generates
/etc/cdi/nvidia.yaml with ``nvidia-ctk cdi generate`` whenever the loaded driver or the
installed toolkit differs from what /var/lib/labfleet/nvidia/cdi-driver-version records.
From 1.18 NVIDIA's own ``nvidia-cdi-refresh.path`` and ``.service`` keep
/var/run/cdi/nvidia.yaml (a directory that takes precedence): labfleet enables both, runs
the service again when the driver or toolkit changed since, and removes the /etc/cdi spec
it wrote before.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebPackages
from pyinfra.operations import files

from labfleet import docker, planning
from labfleet.facts.docker import DaemonJson, DaemonJsonState
from labfleet.facts.nvidia import GpuHost, GpuHostState, NvidiaRuntimeState, RuntimeState
from labfleet.facts.system import ServiceState, UnitState
from labfleet.model import release_below
from labfleet.nvidia import GPU_READ, installed_toolkit, reads_nothing, wants_toolkit
from labfleet.planning import Read, step
from labfleet.settings import Settings

RUNTIME = "nvidia-container-runtime"
HOOK = "nvidia-container-runtime-hook"
CGROUPFS = "native.cgroupdriver=cgroupfs"
CDI_SPEC = "/etc/cdi/nvidia.yaml"
# What the current CDI spec was made for: "<driver> <toolkit>", or "refresh <driver> <toolkit>"
# when NVIDIA's nvidia-cdi-refresh.service made it (labfleet before the toolkit floor wrote
# the driver alone).
CDI_MARKER = "/var/lib/labfleet/nvidia/cdi-driver-version"
# Toolkit 1.18 and later ship these units (NVIDIA/nvidia-container-toolkit,
# deployments/systemd/): the path unit watches the kernel's modules.dep and nvidia-ctk, and
# starts the oneshot service, which runs `nvidia-ctk cdi generate` into /var/run/cdi, a CDI
# directory that takes precedence over /etc/cdi. Their postinst enables both.
CDI_REFRESH_TOOLKIT = "1.18"
CDI_REFRESH_UNIT = "nvidia-cdi-refresh.path"
CDI_REFRESH_SERVICE = "nvidia-cdi-refresh.service"
CDI_REFRESH_SPEC = "/var/run/cdi/nvidia.yaml"
# Present while labfleet keeps nvidia as dockerd's default runtime (nvidia_default_runtime),
# so that turning the setting off removes only a default-runtime that labfleet wrote.
DEFAULT_RUNTIME_MARKER = "/var/lib/labfleet/nvidia/default-runtime"

RUNTIME_STATE = {
    "spec": CDI_SPEC,
    "marker": CDI_MARKER,
    "refresh_spec": CDI_REFRESH_SPEC,
    "default_runtime": DEFAULT_RUNTIME_MARKER,
    "hook": HOOK,
    "service": docker.DOCKER_SERVICE,
}


# --- What the runtime step reads -------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeHost:
    """What the runtime's keys and step decide from, read in deploy.py's one batch."""

    gpu: GpuHostState
    packages: dict[str, list[str]]
    daemon_json: DaemonJsonState
    runtime: RuntimeState
    cdi_refresh: UnitState
    cdi_refresh_service: UnitState


def reads(settings: Settings) -> dict[str, Read]:
    """daemon.json, the hook, the CDI spec and its units; nothing where no NVIDIA step runs."""
    if reads_nothing(settings):
        return {}
    return {
        "gpu": GPU_READ,
        "packages": Read(DebPackages),
        "daemon_json": Read(DaemonJson, {"path": docker.DAEMON_JSON}),
        "runtime": Read(NvidiaRuntimeState, RUNTIME_STATE),
        "cdi_refresh": Read(ServiceState, {"service": CDI_REFRESH_UNIT}),
        "cdi_refresh_service": Read(ServiceState, {"service": CDI_REFRESH_SERVICE}),
    }


def snapshot(settings: Settings) -> RuntimeHost:
    """This host's RuntimeHost: the batch's readings while planning, fresh while executing."""
    return planning.snapshot(RuntimeHost, reads(settings))


def runtime_state() -> RuntimeState:
    """NvidiaRuntimeState read now, for an operation that runs after this run changed the host."""
    return host.get_fact(NvidiaRuntimeState, **RUNTIME_STATE)


def exec_opts_with_cgroupfs(current) -> list[str]:
    """daemon.json's exec-opts with Docker's cgroupfs driver: other options are kept, in order."""
    opts = [opt for opt in current if isinstance(opt, str)] if isinstance(current, list) else []
    if CGROUPFS in opts and not any(o.startswith("native.cgroupdriver=") and o != CGROUPFS for o in opts):
        return opts
    return [opt for opt in opts if not opt.startswith("native.cgroupdriver=")] + [CGROUPFS]


def daemon_keys(settings: Settings) -> dict:
    """The daemon.json keys of the NVIDIA runtime, for the docker step's one merge.

    The runtime entry is what ``nvidia-ctk runtime configure`` writes, so a host set up by
    hand by NVIDIA's guide keeps its entry as it is. The cgroupfs driver keeps GPUs in
    containers across ``systemctl daemon-reload`` (see the module docstring); other
    exec-opts found in daemon.json are kept, in their order.
    """
    if not wants_toolkit(settings):
        return {}
    current = snapshot(settings).daemon_json
    keys: dict = {
        "runtimes": {"nvidia": {"path": RUNTIME, "args": []}},
        "exec-opts": exec_opts_with_cgroupfs((current["config"] or {}).get("exec-opts")),
    }
    if settings.nvidia_default_runtime:
        keys["default-runtime"] = "nvidia"
    return keys


def daemon_keys_to_drop(settings: Settings) -> dict:
    """daemon.json keys that labfleet wrote and the settings no longer ask for: key -> the value it wrote.

    ``nvidia_default_runtime`` turned off removes ``"default-runtime": "nvidia"`` only where
    DEFAULT_RUNTIME_MARKER says labfleet set it: one set by hand (NVIDIA's guide has
    ``nvidia-ctk runtime configure --set-as-default``) stays.
    """
    if settings.nvidia_default_runtime or not wants_toolkit(settings):
        return {}
    return {"default-runtime": "nvidia"} if snapshot(settings).runtime["default_runtime"] else {}


def dockerd_predates_hook(state: Mapping) -> bool:
    """dockerd is running and became active before the NVIDIA hook was installed."""
    started, hook = state["service_started"], state["hook_changed"]
    return started is not None and hook is not None and started < hook


def uses_cdi_refresh(toolkit: str | None, path_unit: Mapping) -> bool:
    """Toolkit 1.18 and later keep their own CDI spec current (nvidia-cdi-refresh), where the units exist."""
    return toolkit is not None and not release_below(toolkit, CDI_REFRESH_TOOLKIT) and docker.unit_exists(path_unit)


def cdi_made_for(driver: str, toolkit: str | None, refresh: bool) -> str:
    """The marker's text for a spec of this driver and toolkit; toolkit None: none installed yet."""
    return ("refresh " if refresh else "") + f"{driver} {toolkit or 'none'}"


def cdi_commands(
    driver: str | None, toolkit: str | None, state: Mapping, path_unit: Mapping, service_unit: Mapping
) -> list[str]:
    """What keeps the CDI spec current for this driver and toolkit; [] when it is.

    + driver: the loaded driver (GpuHost), None when none is loaded
    + toolkit: the installed toolkit (installed_toolkit)
    + state: NvidiaRuntimeState
    + path_unit, service_unit: ServiceState of nvidia-cdi-refresh.path and .service

    The spec lists the driver's libraries by version, and the toolkit writes the hooks and
    their paths: either changing makes it stale. Before toolkit 1.18 labfleet generates
    /etc/cdi/nvidia.yaml with nvidia-ctk; from 1.18 NVIDIA's nvidia-cdi-refresh units keep
    /var/run/cdi/nvidia.yaml (both enabled, the path unit running; the service is restarted
    when the driver or toolkit changed since it last ran), and the /etc/cdi spec that
    labfleet wrote earlier goes, so that only one spec describes the GPUs.
    """
    commands = []
    refresh = uses_cdi_refresh(toolkit, path_unit)
    made_for = state["spec_for"] or ""
    if refresh:
        units = f"{CDI_REFRESH_UNIT} {CDI_REFRESH_SERVICE}"
        if path_unit["enabled"] != "enabled" or service_unit["enabled"] != "enabled":
            commands.append(f"systemctl enable {units}")
        if path_unit["active"] != "active":
            commands.append(f"systemctl start {CDI_REFRESH_UNIT}")
        if state["spec"] and made_for and not made_for.startswith("refresh "):
            commands.append(f"rm -f {shlex.quote(CDI_SPEC)}")
    if driver is None:
        return commands
    wanted = cdi_made_for(driver, toolkit, refresh)
    if made_for == wanted and (state["refresh_spec"] if refresh else state["spec"]):
        return commands
    if refresh:
        missing = shlex.quote(
            f"labfleet: {CDI_REFRESH_SERVICE} wrote no {CDI_REFRESH_SPEC} for driver {driver}; "
            f"see journalctl -u {CDI_REFRESH_SERVICE}, then run the deploy again"
        )
        commands.append(
            f"systemctl restart {CDI_REFRESH_SERVICE} && "
            f"{{ [ -f {shlex.quote(CDI_REFRESH_SPEC)} ] || {{ echo {missing} >&2; exit 1; }}; }}"
        )
    else:
        commands.append(
            f"install -d -m 755 {shlex.quote(posixpath.dirname(CDI_SPEC))} && "
            f"nvidia-ctk cdi generate --output={shlex.quote(CDI_SPEC)}"
        )
    q_marker = shlex.quote(CDI_MARKER)
    commands.append(
        f"install -d -m 755 {shlex.quote(posixpath.dirname(CDI_MARKER))} && "
        f"echo {shlex.quote(wanted)} > {q_marker}.new && mv -f {q_marker}.new {q_marker}"
    )
    return commands


@operation(is_idempotent=True)
def keep_cdi_spec_current():
    """Keep NVIDIA's CDI spec current for the loaded driver and the installed toolkit.

    Needed wherever a GPU is asked for through CDI: from Docker 29.2, ``--gpus`` and
    compose's ``driver: nvidia`` become CDI requests (``nvidia.com/gpu=all``) whenever
    nvidia-cdi-hook is on dockerd's PATH (moby#50228), and a stale spec then stops every
    GPU container. See ``cdi_commands`` for how.

    **Example:**

    .. code:: python

        keep_cdi_spec_current(name="Keep the CDI spec current")
    """
    driver = host.get_fact(GpuHost)["driver"]
    toolkit = installed_toolkit(host.get_fact(DebPackages))
    path_unit = host.get_fact(ServiceState, service=CDI_REFRESH_UNIT)
    service_unit = host.get_fact(ServiceState, service=CDI_REFRESH_SERVICE)
    commands = cdi_commands(driver, toolkit, runtime_state(), path_unit, service_unit)
    if not commands:
        host.noop(f"the CDI spec is for driver {driver} and toolkit {toolkit}" if driver else "no driver is loaded")
        return
    yield from commands


@step("Configure the NVIDIA runtime")
def configure_container_runtime(settings: Settings, toolkit: OperationMeta | None = None):
    """After the docker step: dockerd aware of the toolkit, the CDI spec current, the default runtime's marker.

    + toolkit: what ``install_container_toolkit`` returned

    Each operation here is skipped when the snapshot shows it current and nothing before it
    changed the host; a toolkit or driver installed by this run changes the host, so then
    each one looks again when it runs.
    """
    if not wants_toolkit(settings):
        host.noop("no NVIDIA GPU on this host: the NVIDIA runtime is not configured")
        return
    state = snapshot(settings)
    # dockerd looks for the hook only when it starts: one running when this run installs the
    # hook restarts once. An upgrade replaces a hook that dockerd already found (a new ctime,
    # the same path), so it restarts nothing; the ctime cannot tell an upgrade from a toolkit
    # installed by hand under a running dockerd, which verify_gpu reports instead.
    if toolkit is not None and state.runtime["hook_changed"] is None:
        docker.restart_service(
            name="Restart dockerd so that it registers NVIDIA's GPU driver",
            service=docker.DOCKER_SERVICE,
            _if=lambda: dockerd_predates_hook(runtime_state()),
        )
    current = not cdi_commands(
        state.gpu["driver"],
        installed_toolkit(state.packages),
        state.runtime,
        state.cdi_refresh,
        state.cdi_refresh_service,
    )
    planning.unless_current(
        keep_cdi_spec_current, current=current, name="Keep the CDI spec current for the driver and the toolkit"
    )
    wanted = settings.nvidia_default_runtime
    planning.unless_current(
        files.file,
        current=state.runtime["default_runtime"] == wanted,
        name=f"{'Record' if wanted else 'Forget'} that labfleet makes nvidia the default runtime",
        path=DEFAULT_RUNTIME_MARKER,
        present=wanted,
    )
