"""The NVIDIA layer: GPU detection, the driver floor, the Container Toolkit, the runtime, CDI.

deploy.py calls it in four places, because Docker must find the toolkit when it starts:

1. ``nvidia_driver.check_driver``: the driver floor, and the driver itself with
   ``nvidia_driver_install`` (labfleet/nvidia_driver.py).
2. ``install_container_toolkit``: NVIDIA's apt repository as a deb822 file whose
   Signed-By names its own keyring, for the host's dpkg architecture, and the four
   toolkit packages, pinned together by ``nvidia_toolkit_version``, or else held at the
   version installed (an apt preferences pin, which ``apt-get upgrade`` and
   unattended-upgrades obey). A toolkit below 1.17.8 (CVE-2025-23266; CVE-2024-0132 was
   fixed in 1.16.2, both container escapes) is upgraded, and a
   ``nvidia_toolkit_version`` below it is refused at validation. It runs *before*
   the docker step: dockerd registers its ``nvidia`` GPU driver (what ``--gpus`` and
   compose's ``driver: nvidia`` use) only when it starts and finds
   nvidia-container-runtime-hook on its PATH; a dockerd started before the toolkit
   answers "could not select device driver "" with capabilities: [[gpu]]". Installed
   first, the toolkit is there when the docker step (re)starts dockerd for its
   daemon.json, and ``nvidia-container-runtime`` exists before a dockerd names it.
3. ``daemon_keys``: the docker step merges them into daemon.json in its one write and
   one restart. NVIDIA's runtime is registered in daemon.json by merge;
   ``nvidia-ctk runtime configure`` would rewrite the file.
4. ``configure_container_runtime``, after the docker step: restarts dockerd when it is
   still the one that started before this run installed the toolkit (an engine that
   was already configured has no daemon.json change to restart for), keeps the CDI spec
   current, and records whether labfleet made nvidia the default runtime, so that
   ``nvidia_default_runtime`` turned off removes only a ``default-runtime`` it wrote.
5. ``check_gpu_architecture``, before the image and JupyterLab: every GPU's compute
   capability (nvidia-smi) against the CUDA architectures of the image's torch wheel; a
   Pascal or Volta card on a CUDA line built without it stops that host, naming the CUDA
   line that runs it (``cuda = "12.6"``).

``verify_gpu``, at the end of the deploy, runs ``nvidia-smi -L`` and the image's smoke
test in one ``docker run --rm --gpus`` container on every GPU host, and fails that host
with the output when the GPU is not visible. It runs on every deploy (a container start
and a torch import, a few seconds per GPU host): cheap next to the cost of a lab that
believes it has GPUs and trains on the CPU. It changes nothing, so it reports no change.

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

``nvidia_toolkit: "auto"`` installs the toolkit where there is a GPU; ``true`` installs
it on hosts that have none yet, so a lab can prepare machines before the cards arrive.
Hosts without a GPU and without ``nvidia_toolkit: true`` skip the NVIDIA steps, and
the output says so.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from urllib.parse import urlsplit, urlunsplit

from pyinfra import host, logger
from pyinfra.api import operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import files

from labfleet import apt, docker, planning, platform
from labfleet.facts.apt import AptFiles
from labfleet.facts.docker import DaemonJson, DaemonJsonState
from labfleet.facts.nvidia import (
    GpuArchitecture,
    GpuArchitectures,
    GpuHost,
    GpuHostState,
    GpuInContainer,
    NvidiaRuntimeState,
    RuntimeState,
)
from labfleet.facts.nvidia_driver import NvidiaDriver, reboot_needed
from labfleet.facts.system import ServiceState, UnitState
from labfleet.image import image_tag
from labfleet.model import TOOLKIT_FLOOR, TOOLKIT_FLOOR_REASON, lock_file, locked_cudas, release_below
from labfleet.planning import Read, step
from labfleet.preflight import failing_command, require
from labfleet.settings import Settings

TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)
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


# --- What the NVIDIA steps read --------------------------------------------------------


@dataclass(frozen=True)
class NvidiaHost:
    """What every NVIDIA step decides from, read once per host while planning (``reads``).

    ``debian_sources`` and ``sources_list`` (the distribution's own apt files) are read only
    with ``nvidia_driver_install``, where the driver may need Debian's non-free component.
    """

    gpu: GpuHostState
    release: dict
    arch: str
    packages: dict[str, list[str]]
    apt_files: AptFiles
    daemon_json: DaemonJsonState
    runtime: RuntimeState
    cdi_refresh: UnitState
    cdi_refresh_service: UnitState
    architectures: list[GpuArchitecture]
    debian_sources: list[str] | None = None
    sources_list: list[str] | None = None


GPU_READ = Read(GpuHost)


def reads(settings: Settings) -> dict[str, Read]:
    """The facts the NVIDIA steps decide from, by NvidiaHost field; none where they do nothing.

    All of them, GPU or not, so that deploy.py's one batch answers every NVIDIA step on a
    GPU host as on a CPU-only one; only ``gpu: false`` without ``nvidia_toolkit: true``
    reads nothing.
    """
    if settings.gpu is False and settings.nvidia_toolkit is not True:
        return {}
    found = {
        "gpu": GPU_READ,
        "release": Read(LinuxDistribution),
        "arch": Read(DebArch),
        "packages": Read(DebPackages),
        "apt_files": apt.repository_read(repository(settings)),
        "daemon_json": Read(DaemonJson, {"path": docker.DAEMON_JSON}),
        "runtime": Read(NvidiaRuntimeState, RUNTIME_STATE),
        "cdi_refresh": Read(ServiceState, {"service": CDI_REFRESH_UNIT}),
        "cdi_refresh_service": Read(ServiceState, {"service": CDI_REFRESH_SERVICE}),
        "architectures": Read(GpuArchitectures),
    }
    if settings.nvidia_driver_install:
        debian_sources, sources_list = platform.DEBIAN_SOURCES
        found["debian_sources"] = Read(FileContents, {"path": debian_sources})
        found["sources_list"] = Read(FileContents, {"path": sources_list})
    return found


def snapshot(settings: Settings) -> NvidiaHost:
    """This host's NvidiaHost: the batch's readings while planning, fresh while executing."""
    return planning.snapshot(NvidiaHost, reads(settings))


# --- Detection -----------------------------------------------------------------------


def has_gpu(settings: Settings) -> bool:
    """`gpu: true/false` decides; `auto` asks the PCI bus and the driver (once per host and run)."""
    if isinstance(settings.gpu, bool):
        return settings.gpu
    return bool(planning.read({"gpu": GPU_READ})["gpu"]["gpus"])


def wants_toolkit(settings: Settings) -> bool:
    """`nvidia_toolkit: true/false` decides; `auto` installs it where there is a GPU."""
    if isinstance(settings.nvidia_toolkit, bool):
        return settings.nvidia_toolkit
    return has_gpu(settings)


@operation(is_idempotent=True)
def explain_skip(reason: str):
    """Say in the run's output why a step does nothing on this host; it changes nothing.

    + reason: the sentence to print

    **Example:**

    .. code:: python

        explain_skip(name="Skip the NVIDIA steps", reason="no NVIDIA GPU on this host")
    """
    if host.state.is_executing:
        logger.info(f"{host.print_prefix}{reason}")
    host.noop(reason)
    return
    yield  # an operation is a generator, even one that yields nothing


# --- The Container Toolkit -------------------------------------------------------------


def toolkit_packages(settings: Settings) -> tuple[str, ...]:
    """The four toolkit packages, each ``=nvidia_toolkit_version`` when that is set."""
    version = settings.nvidia_toolkit_version
    return tuple(f"{name}={version}" if version else name for name in TOOLKIT_PACKAGES)


def installed_toolkit(packages: Mapping) -> str | None:
    """The installed toolkit's version (its base package carries nvidia-ctk), from DebPackages."""
    versions = packages.get("nvidia-container-toolkit-base") or packages.get("nvidia-container-toolkit")
    return sorted(versions)[-1] if versions else None


def toolkit_below_floor(packages: Mapping) -> bool:
    """An installed toolkit older than TOOLKIT_FLOOR: a known container escape, upgraded by the deploy."""
    version = installed_toolkit(packages)
    return version is not None and release_below(version, TOOLKIT_FLOOR)


def floor_check_command(host_name: str, source_url: str) -> str:
    """Shell that fails the host unless the toolkit installed now is at TOOLKIT_FLOOR or later (dpkg's order)."""
    below = (
        f"labfleet: host {host_name}: the NVIDIA Container Toolkit installed from {source_url} is $v, below "
        f"{TOOLKIT_FLOOR} ({TOOLKIT_FLOOR_REASON}); that repository offers nothing newer: point "
        f"nvidia_toolkit_apt_mirror at one that has {TOOLKIT_FLOOR} or later, then run the deploy again"
    )
    return (
        "v=$(dpkg-query -W -f '${Version}' nvidia-container-toolkit-base 2>/dev/null); "
        f'dpkg --compare-versions "$v" ge {TOOLKIT_FLOOR} || {{ echo "{below}" >&2; exit 1; }}'
    )


@operation(is_idempotent=True)
def install_toolkit_packages(packages: Sequence[str], source_url: str, refresh=False, hold_file: str | None = None):
    """Install the toolkit packages that are missing, and upgrade a toolkit below TOOLKIT_FLOOR.

    + packages: the four package names, each optionally ``name=version``
    + source_url: the repository they come from, for the message when it has nothing new enough
    + refresh: run ``apt-get update`` even when nothing is missing (a source changed); a
      callable is asked when the operation runs
    + hold_file: the preferences file that holds the installed version (no version asked
      for); an upgrade to the floor removes it first, and ``apt.hold_packages`` writes it
      again at the new version

    After an install or upgrade, dpkg's own comparison checks the floor, so a mirror that
    serves only older releases stops the host with what to do.

    **Example:**

    .. code:: python

        install_toolkit_packages(name="Install the toolkit", packages=TOOLKIT_PACKAGES,
                                 source_url="https://nvidia.github.io/libnvidia-container/stable/deb/amd64")
    """
    installed = host.get_fact(DebPackages)
    missing = apt.missing_packages(packages, installed)
    below = toolkit_below_floor(installed)
    if not missing and not below and not (refresh() if callable(refresh) else refresh):
        host.noop(f"{', '.join(apt.split_version(p)[0] for p in packages)} already installed")
        return
    yield apt.apt_update()
    if below and hold_file:
        yield f"rm -f {shlex.quote(hold_file)}"
    install = [package for package in packages if below or package in missing]
    if install:
        quoted = " ".join(shlex.quote(package) for package in install)
        yield apt.apt_get(f"install --no-install-recommends --allow-downgrades {quoted}")
        yield floor_check_command(host.name, source_url)


# What names NVIDIA's own repository in an apt entry, wherever it came from.
UPSTREAM_MARKER = "nvidia.github.io/libnvidia-container/"
# NVIDIA's Container Toolkit repository as labfleet keeps it; its markers come from the
# settings (repository()).
REPOSITORY = apt.AptRepository(
    name="nvidia-container-toolkit",
    pin_packages=TOOLKIT_PACKAGES,
    owner="NVIDIA",
    product="the NVIDIA Container Toolkit",
    markers=(UPSTREAM_MARKER,),
    # Where NVIDIA's install guide puts the key, for the .list file it writes.
    key_files=("/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg",),
    sources_comment=(
        "NVIDIA Container Toolkit; written by labfleet (nvidia_toolkit_apt_mirror, nvidia_toolkit_apt_key)."
    ),
    pin_comment="Written by labfleet (nvidia_toolkit_version): the four toolkit packages move together.",
)
HOLD_COMMENT = (
    "Written by labfleet: holds the NVIDIA Container Toolkit at its installed version against apt upgrade and "
    f"unattended-upgrades; labfleet moves it only for nvidia_toolkit_version or the {TOOLKIT_FLOOR} security floor."
)
SOURCES_FILE, KEYRING, PIN_FILE = REPOSITORY.sources_file, REPOSITORY.keyring, REPOSITORY.pin_file


def repository(settings: Settings) -> apt.AptRepository:
    """NVIDIA's Container Toolkit repository, recognised upstream and at nvidia_toolkit_apt_mirror."""
    return replace(REPOSITORY, markers=repository_markers(settings))


def repository_url(settings: Settings, arch: str) -> str:
    """NVIDIA's repository is flat, one per architecture: ``<mirror>/<arch>`` with suite ``/``."""
    return f"{settings.nvidia_toolkit_apt_mirror}/{arch}"


def key_url(settings: Settings) -> str:
    """nvidia_toolkit_apt_key, or NVIDIA's layout: ``gpgkey`` two levels above ``<...>/stable/deb``."""
    if settings.nvidia_toolkit_apt_key:
        return settings.nvidia_toolkit_apt_key
    parts = urlsplit(settings.nvidia_toolkit_apt_mirror)
    root = posixpath.dirname(posixpath.dirname(parts.path.rstrip("/") or "/"))
    return urlunsplit(parts._replace(path=posixpath.join(root, "gpgkey")))


def apt_source(settings: Settings, arch: str) -> apt.AptSource:
    """What nvidia-container-toolkit.sources says on a host of dpkg architecture arch."""
    return apt.AptSource(
        uris=repository_url(settings, arch),
        suites="/",
        components=None,
        architectures=arch,
        key_url=key_url(settings),
        pin_version=settings.nvidia_toolkit_version,
        hold=settings.nvidia_toolkit_version is None,
    )


def repository_markers(settings: Settings) -> tuple[str, ...]:
    mirror = settings.nvidia_toolkit_apt_mirror.split("://", 1)[-1]
    return tuple(dict.fromkeys((UPSTREAM_MARKER, mirror + "/")))


@step("Install the NVIDIA Container Toolkit")
def install_container_toolkit(settings: Settings) -> OperationMeta | None:
    """NVIDIA's signed apt repository and the four toolkit packages, held against apt upgrade;
    returns the install operation (for ``configure_container_runtime``), or None when it is
    not planned.

    With ``nvidia_toolkit_version`` the packages are pinned there (the repository's pin
    file). Without it, the first install takes the repository's newest release, and
    ``apt.hold_packages`` then holds the packages at the installed version: unattended-upgrades
    and ``apt upgrade`` leave them alone, and only a setting (or the security floor) moves
    them. A toolkit below TOOLKIT_FLOOR is upgraded to the newest release.
    """
    if not wants_toolkit(settings):
        host.noop("no NVIDIA GPU on this host: the NVIDIA Container Toolkit is skipped")
        return None
    state = snapshot(settings)
    nvidia_repo, source = repository(settings), apt_source(settings, state.arch)
    problems = []
    try:
        platform.distribution(state.release)
    except platform.UnsupportedDistribution as error:
        problems.append(f"host {settings.host}: {error}; labfleet installs NVIDIA's toolkit on Debian and Ubuntu")
    mixed = apt.mixed_files(nvidia_repo, source, state.apt_files)
    if mixed:
        problems.append(apt.mixed_problem(nvidia_repo, settings.host, mixed))
    require(
        name="Check that the NVIDIA Container Toolkit can be installed here",
        ok=not problems,
        problem="; ".join(problems),
    )
    if problems:
        return None
    repository_changed = apt.add_repository(nvidia_repo, source, state.apt_files, state.packages)
    packages = toolkit_packages(settings)
    below = toolkit_below_floor(state.packages)
    installed = planning.unless_current(
        install_toolkit_packages,
        current=not apt.missing_packages(packages, state.packages) and not below,
        name=(
            f"Upgrade the NVIDIA Container Toolkit {installed_toolkit(state.packages)} to {TOOLKIT_FLOOR} or later"
            if below
            else "Install the NVIDIA Container Toolkit packages"
        ),
        packages=packages,
        source_url=source.uris,
        refresh=repository_changed,
        hold_file=PIN_FILE if source.hold else None,
    )
    if source.hold:
        planning.unless_current(
            apt.hold_packages,
            current=apt.hold_is_current(TOOLKIT_PACKAGES, PIN_FILE, HOLD_COMMENT, state.packages, state.apt_files),
            name="Hold the NVIDIA Container Toolkit at its installed version",
            packages=TOOLKIT_PACKAGES,
            path=PIN_FILE,
            comment=HOLD_COMMENT,
        )
    return installed


# --- The runtime in Docker ---------------------------------------------------------------

RUNTIME_STATE = {
    "spec": CDI_SPEC,
    "marker": CDI_MARKER,
    "refresh_spec": CDI_REFRESH_SPEC,
    "default_runtime": DEFAULT_RUNTIME_MARKER,
    "hook": HOOK,
    "service": docker.DOCKER_SERVICE,
}


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


# --- The GPUs' architectures against the image's torch -------------------------------------

# The CUDA architectures (compute capabilities) each locked torch wheel is built for, keyed
# by (torch, CUDA line): the wheel's CUDA_ARCH_FLAGS, as torch._C._cuda_getArchFlags() prints
# them (read from libtorch_python.so of the PyPI wheels that container/requirements/
# pytorch-cu*.txt lock). PyTorch dropped Maxwell and Pascal from its CUDA 12.8 builds, and
# Volta from 12.8 in 2.11 and from every 13.0 build (pytorch/pytorch#172352); its 12.6 builds
# keep them all. tests/unit checks that every lock's torch is listed here.
TORCH_ARCHS: dict[tuple[str, str], tuple[str, ...]] = {
    ("2.7.1", "12.6"): ("5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "9.0"),
    ("2.10.0", "12.8"): ("7.0", "7.5", "8.0", "8.6", "9.0", "10.0", "12.0"),
    ("2.11.0", "13.0"): ("7.5", "8.0", "8.6", "9.0", "10.0", "12.0"),
}
_TORCH_PIN = re.compile(r"^torch==(\S+)", re.MULTILINE)


@cache
def locked_torch(profile: str, cuda: str) -> str | None:
    """The torch version that the image's lock for this profile and CUDA line installs, or None."""
    path = lock_file(profile, cuda)
    match = _TORCH_PIN.search(path.read_text()) if path else None
    return match.group(1) if match else None


def _cap(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor)


def runs_on(compute_cap: tuple[int, int], archs: Sequence[str]) -> bool:
    """Whether code built for archs runs on a GPU of compute_cap.

    A cubin runs on its own major version at the same or a higher minor (sm_86 on 8.9); a GPU
    newer than every arch is left to the wheel's PTX, which this check does not judge.
    """
    caps = [_cap(arch) for arch in archs]
    major, minor = compute_cap
    return any(m == major and n <= minor for m, n in caps) or compute_cap > max(caps)


def torch_archs(profile: str, cuda: str) -> tuple[str | None, tuple[str, ...]]:
    """(torch version, its CUDA architectures) of the image for this profile and CUDA line; () when unknown."""
    torch = locked_torch(profile, cuda)
    return torch, TORCH_ARCHS.get((torch or "", cuda), ())


def architecture_problem(host_name: str, profile: str, cuda: str, gpus: Sequence[Mapping]) -> str | None:
    """The one line that refuses a host whose GPUs the image's torch has no kernels for; None when all run.

    + gpus: GpuArchitectures
    """
    torch, archs = torch_archs(profile, cuda)
    old = [gpu for gpu in gpus if archs and not runs_on(gpu["compute_cap"], archs)]
    if not old:
        return None
    named = ", ".join(
        f"GPU {gpu['index']} ({gpu['name']}) has compute capability {'.'.join(map(str, gpu['compute_cap']))}"
        for gpu in old
    )
    # The newest locked CUDA line whose torch runs every GPU here (its torch is the newest too).
    lines = [(other, *torch_archs(profile, other)) for other in locked_cudas(profile)]
    fixes = [c for c in lines if c[2] and all(runs_on(gpu["compute_cap"], c[2]) for gpu in gpus)]
    if fixes:
        line, fix_torch, fix_archs = fixes[-1]
        fix = (
            f'set cuda = "{line}" for this host (torch {fix_torch}, built for {fix_archs[0]} and newer), '
            "then run the deploy again"
        )
    else:
        fix = "no CUDA line labfleet locks has kernels for it; use another GPU or set gpu = false for this host"
    return (
        f"host {host_name}: {named}, and the image's torch {torch} for CUDA {cuda} is built for compute "
        f'capability {archs[0]} and newer (it would fail with "no kernel image is available"); {fix}'
    )


@operation(is_idempotent=True)
def check_gpu_architectures(profile: str, cuda: str):
    """Fail this host unless the image's torch has kernels for every GPU that the loaded driver lists.

    + profile: the image profile
    + cuda: the image's CUDA line

    **Example:**

    .. code:: python

        check_gpu_architectures(name="Check the GPUs", profile="pytorch", cuda="12.8")
    """
    gpus = host.get_fact(GpuArchitectures)
    problem = architecture_problem(host.name, profile, cuda, gpus)
    if problem is None:
        host.noop(f"{len(gpus)} GPU(s) run the image's torch" if gpus else "no GPU listed by nvidia-smi")
        return
    yield failing_command(problem)


@step("Check the GPUs against the image's CUDA line")
def check_gpu_architecture(settings: Settings):
    """Refuse, before the image and JupyterLab, a host whose GPUs the image's torch was not built for.

    torch's CUDA wheels carry kernels for a list of compute capabilities; on an older GPU
    every CUDA call fails with "no kernel image is available for execution on the device",
    long after the deploy said the host was ready. A host with a driver loaded is checked
    with nvidia-smi; one without is checked again when this run installed its driver.
    """
    if not has_gpu(settings):
        host.noop("no NVIDIA GPU on this host: no GPU architecture to check")
        return
    state = snapshot(settings)
    problem = architecture_problem(settings.host, settings.image_profile, settings.cuda, state.architectures)
    planning.unless_current(
        check_gpu_architectures,
        current=problem is None,
        name="Check that the image's torch has kernels for every GPU",
        profile=settings.image_profile,
        cuda=settings.cuda,
    )


# --- Verify -------------------------------------------------------------------------------


def gpus_flag(devices) -> str:
    """``docker run --gpus`` for gpu_devices: ``all``, a count, or ``"device=0,GPU-..."``."""
    if devices == "all":
        return "all"
    if isinstance(devices, int):
        return str(devices)
    return f'"device={",".join(devices)}"'


def gpu_check_problem(result: Mapping) -> str | None:
    """What is wrong with a GpuInContainer result, or None when the GPU was visible and working."""
    output = result["output"]
    if result["rc"] != 0:
        return "the GPU is not usable in the lab image"
    if not any(line.startswith("GPU ") for line in output):
        return "nvidia-smi -L listed no GPU in the lab image"
    if any(line.startswith("CUDA available: False") for line in output):
        return "torch in the lab image does not see CUDA (a driver older than the image's CUDA?)"
    return None


@operation(is_idempotent=True)
def check_gpu_in_container(image: str, gpus: str):
    """Fail this host, showing the output, unless a container of image sees the GPU and passes its smoke test.

    + image: the lab image
    + gpus: the ``docker run --gpus`` value

    The check starts a container, so it runs once, when the deploy executes: pyinfra also
    calls an operation while planning, before the image of a first run exists.

    **Example:**

    .. code:: python

        check_gpu_in_container(name="GPU in the image", image="labfleet/jupyterlab:pytorch-0123456789ab", gpus="all")
    """
    if not host.state.is_executing:
        return
    # A module older than the installed user space fails every container on NVML; the driver
    # step has said "reboot" (labfleet.nvidia_driver), so the check waits for that reboot.
    due = reboot_needed(host.get_fact(NvidiaDriver))
    if due is not None:
        host.noop(f"the GPU check is skipped: module {due[0] or 'none'} is loaded, {due[1]} installed (reboot needed)")
        return
    result = host.get_fact(GpuInContainer, image=image, gpus=gpus)
    problem = gpu_check_problem(result)
    if problem is None:
        gpus_seen = [line for line in result["output"] if line.startswith("GPU ")]
        host.noop(f"{len(gpus_seen)} GPU(s) visible in {image}; smoke test passed")
        return
    output = "\n".join(result["output"][-40:])
    message = f"labfleet: {problem}: docker run --rm --gpus {gpus} {image} printed:\n{output}"
    yield f"echo {shlex.quote(message)} >&2; exit 1"


@step("Check the GPU in the lab image")
def verify_gpu(settings: Settings):
    if not has_gpu(settings):
        host.noop("no NVIDIA GPU on this host: the GPU check is skipped")
        return
    check_gpu_in_container(
        name="Check that the lab image sees the GPU (nvidia-smi and the smoke test)",
        image=image_tag(settings),
        gpus=gpus_flag(settings.gpu_devices),
    )
