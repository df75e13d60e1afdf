"""The NVIDIA layer: GPU detection, the driver floor, the Container Toolkit, the runtime, CDI.

deploy.py calls it in four places, because Docker must find the toolkit when it starts:

1. ``nvidia_driver.check_driver``: the driver floor, and the driver itself with
   ``nvidia_driver_install`` (labfleet/nvidia_driver.py).
2. ``install_container_toolkit``: NVIDIA's apt repository as a deb822 file whose
   Signed-By names its own keyring, for the host's dpkg architecture, and the four
   toolkit packages (pinned together by ``nvidia_toolkit_version``). It runs *before*
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
   was already configured has no daemon.json change to restart for), generates the CDI
   spec and enables ``nvidia-cdi-refresh`` where the toolkit ships it.

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

The CDI spec (``nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml``) lists the
driver's libraries by version, so it is regenerated when the loaded driver differs from
the one it was generated for: labfleet keeps that version in
/var/lib/labfleet/nvidia/cdi-driver-version. ``nvidia-cdi-refresh.path`` (toolkit 1.18
and later) regenerates its own spec under /var/run/cdi, which takes precedence, when the
driver changes between deploys; it is enabled where it exists.

``nvidia_toolkit: "auto"`` installs the toolkit where there is a GPU; ``true`` installs
it on hosts that have none yet, so a lab can prepare machines before the cards arrive.
Hosts without a GPU and without ``nvidia_toolkit: true`` skip the NVIDIA steps, and
the output says so.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

from pyinfra import host, logger
from pyinfra.api import operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import LinuxDistribution

from labfleet import apt, docker, planning, platform
from labfleet.facts.apt import AptFiles
from labfleet.facts.docker import DaemonJson, DaemonJsonState
from labfleet.facts.nvidia import GpuHost, GpuHostState, GpuInContainer, NvidiaRuntimeState, RuntimeState
from labfleet.facts.nvidia_driver import NvidiaDriver, reboot_needed
from labfleet.facts.system import ServiceState, UnitState
from labfleet.image import image_tag
from labfleet.planning import Read, step
from labfleet.preflight import require
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
CDI_MARKER = "/var/lib/labfleet/nvidia/cdi-driver-version"
CDI_REFRESH_UNIT = "nvidia-cdi-refresh.path"


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
    )


def repository_markers(settings: Settings) -> tuple[str, ...]:
    mirror = settings.nvidia_toolkit_apt_mirror.split("://", 1)[-1]
    return tuple(dict.fromkeys((UPSTREAM_MARKER, mirror + "/")))


@step("Install the NVIDIA Container Toolkit")
def install_container_toolkit(settings: Settings) -> OperationMeta | None:
    """NVIDIA's signed apt repository and the four toolkit packages; returns the install
    operation (for ``configure_container_runtime``), or None when it is not planned."""
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
    return planning.unless_current(
        apt.ensure_packages,
        current=not apt.missing_packages(packages, state.packages),
        name="Install the NVIDIA Container Toolkit packages",
        packages=packages,
        refresh=repository_changed,
    )


# --- The runtime in Docker ---------------------------------------------------------------

RUNTIME_STATE = {"spec": CDI_SPEC, "marker": CDI_MARKER, "hook": HOOK, "service": docker.DOCKER_SERVICE}


def runtime_state(spec: str = CDI_SPEC, marker: str = CDI_MARKER) -> RuntimeState:
    """NvidiaRuntimeState read now, for an operation that runs after this run changed the host."""
    return host.get_fact(NvidiaRuntimeState, spec=spec, marker=marker, hook=HOOK, service=docker.DOCKER_SERVICE)


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


def cdi_spec_is_current(driver: str | None, state: Mapping) -> bool:
    """No driver loaded: nothing to describe. Otherwise the spec must exist and be for this driver."""
    return driver is None or bool(state["spec"] and state["spec_driver"] == driver)


def dockerd_predates_hook(state: Mapping) -> bool:
    """dockerd is running and became active before the NVIDIA hook was installed."""
    started, hook = state["service_started"], state["hook_changed"]
    return started is not None and hook is not None and started < hook


def cdi_refresh_is_current(unit: Mapping) -> bool:
    """nvidia-cdi-refresh is enabled and active, or this toolkit does not ship it."""
    return not docker.unit_exists(unit) or (unit["enabled"], unit["active"]) == ("enabled", "active")


@operation(is_idempotent=True)
def generate_cdi_spec(spec: str = CDI_SPEC, marker: str = CDI_MARKER):
    """Generate NVIDIA's CDI spec when the loaded driver is not the one it was generated for.

    + spec: where ``nvidia-ctk cdi generate`` writes the spec
    + marker: the file that keeps the driver version the spec was generated for

    **Example:**

    .. code:: python

        generate_cdi_spec(name="Generate the CDI spec")
    """
    driver = host.get_fact(GpuHost)["driver"]
    state = runtime_state(spec, marker)
    if driver is None:
        host.noop("no NVIDIA driver is loaded: there is no CDI spec to generate")
        return
    if cdi_spec_is_current(driver, state):
        host.noop(f"{spec} is for driver {driver}")
        return
    q_spec, q_marker = shlex.quote(spec), shlex.quote(marker)
    yield (
        f"install -d -m 755 {shlex.quote(posixpath.dirname(spec))} {shlex.quote(posixpath.dirname(marker))} && "
        f"nvidia-ctk cdi generate --output={q_spec} && "
        f"echo {shlex.quote(driver)} > {q_marker}.new && mv -f {q_marker}.new {q_marker}"
    )


@step("Configure the NVIDIA runtime")
def configure_container_runtime(settings: Settings, toolkit: OperationMeta | None = None):
    """After the docker step: dockerd aware of the toolkit, the CDI spec, nvidia-cdi-refresh.

    + toolkit: what ``install_container_toolkit`` returned

    Each operation here is skipped when the snapshot shows it current and nothing before it
    changed the host; a toolkit or driver installed by this run changes the host, so then
    each one looks again when it runs.
    """
    if not wants_toolkit(settings):
        host.noop("no NVIDIA GPU on this host: the NVIDIA runtime is not configured")
        return
    if toolkit is not None:
        docker.restart_service(
            name="Restart dockerd so that it registers NVIDIA's GPU driver",
            service=docker.DOCKER_SERVICE,
            _if=[toolkit.did_change, lambda: dockerd_predates_hook(runtime_state())],
        )
    state = snapshot(settings)
    planning.unless_current(
        generate_cdi_spec,
        current=cdi_spec_is_current(state.gpu["driver"], state.runtime),
        name="Generate the CDI spec for the loaded driver",
    )
    planning.unless_current(
        docker.ensure_service,
        current=cdi_refresh_is_current(state.cdi_refresh),
        name=f"Enable {CDI_REFRESH_UNIT} where the toolkit has it",
        service=CDI_REFRESH_UNIT,
        if_present=True,
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
