"""The NVIDIA layer: GPU detection, the driver floor, the Container Toolkit, the runtime, CDI.

deploy.py calls it in four places, because Docker must find the toolkit when it starts:

1. ``check_driver``: on a GPU host (``gpu``, or detection: PCI vendor 10de or
   /proc/driver/nvidia), a driver that is missing or older than ``nvidia_driver_min``
   stops that host, alone, with what to install. An image whose CUDA is newer than the
   driver would fail only later, inside the container, with "CUDA driver version is
   insufficient". With ``nvidia_driver_install: true`` the deploy installs the
   distribution's driver branch instead (Ubuntu: ``ubuntu-drivers install
   nvidia:<branch>-server``, which picks Canonical's signed modules for the running
   kernel; Debian: ``nvidia-driver`` from non-free, enabled in the distribution's own
   sources entry when missing), reboots with ``server.reboot`` only when packages
   changed, and checks the loaded driver again after the reboot.
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

import hashlib
import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import StringIO
from urllib.parse import urlsplit, urlunsplit

from pyinfra import host, logger
from pyinfra.api import FileUploadCommand, deploy, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import files, server

from labfleet import apt, docker
from labfleet.facts.apt import AptSourceEntries
from labfleet.facts.docker import DaemonJson
from labfleet.facts.nvidia import GpuHost, GpuInContainer, NvidiaRuntimeState
from labfleet.facts.system import ServiceState
from labfleet.image import image_tag
from labfleet.planning import FactBatch, plan_notice, planned
from labfleet.preflight import require
from labfleet.settings import Settings

TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)
SOURCES_FILE = "/etc/apt/sources.list.d/nvidia-container-toolkit.sources"
KEYRING = f"{apt.KEYRING_DIR}/nvidia-container-toolkit.asc"
PIN_FILE = "/etc/apt/preferences.d/labfleet-nvidia-container-toolkit"
NVIDIA_REPOSITORY = "nvidia.github.io/libnvidia-container/"
RUNTIME = "nvidia-container-runtime"
HOOK = "nvidia-container-runtime-hook"
CGROUPFS = "native.cgroupdriver=cgroupfs"
CDI_SPEC = "/etc/cdi/nvidia.yaml"
CDI_MARKER = "/var/lib/labfleet/nvidia/cdi-driver-version"
CDI_REFRESH_UNIT = "nvidia-cdi-refresh.path"
# The files the Debian installer writes; non-free is enabled only there, never in a
# third party's file whose repository may not have that component.
DEBIAN_SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
DEBIAN_DRIVER_COMPONENTS = ("contrib", "non-free", "non-free-firmware")


# --- Detection and the driver floor ---------------------------------------------------


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def driver_meets(driver: str | None, floor: str) -> bool:
    """True when driver >= floor; "570" means any 570.x."""
    return driver is not None and version_tuple(driver) >= version_tuple(floor)


_planned_gpu_state: dict[tuple[int, str], dict] = {}


def gpu_state() -> dict:
    """This host's GpuHost fact as read while planning, once per host and run.

    Every NVIDIA step decides from the same reading, and a CPU-only host pays one round
    trip for all of them. Operations that must see a change (a reboot) read it again.
    """
    key = (id(host.state), host.name)
    if key not in _planned_gpu_state:
        _planned_gpu_state[key] = planned(GpuHost)
    return _planned_gpu_state[key]


def state_parts(settings: Settings) -> tuple:
    """What the NVIDIA steps decide from while planning: the PCI bus and driver, unless `gpu` is false."""
    return () if settings.gpu is False else ((GpuHost, {}),)


def has_gpu(settings: Settings) -> bool:
    """`gpu: true/false` decides; `auto` asks the PCI bus and the driver."""
    if isinstance(settings.gpu, bool):
        return settings.gpu
    return bool(gpu_state()["gpus"])


def wants_toolkit(settings: Settings) -> bool:
    """`nvidia_toolkit: true/false` decides; `auto` installs it where there is a GPU."""
    if isinstance(settings.nvidia_toolkit, bool):
        return settings.nvidia_toolkit
    return has_gpu(settings)


def driver_branch(settings: Settings) -> str:
    return settings.nvidia_driver_min.split(".")[0]


def driver_advice(settings: Settings, distro: dict, gpu: dict) -> str:
    """What to install, in the words of this host's distribution."""
    branch = driver_branch(settings)
    name = (distro.get("name") or "").lower()
    if "ubuntu" in name:
        install = f"`sudo apt install nvidia-driver-{branch}-server` (or `sudo ubuntu-drivers install`)"
    elif "debian" in name:
        install = "`nvidia-driver` from Debian's non-free component (or NVIDIA's CUDA repository)"
    else:
        install = f"NVIDIA driver {branch} or newer"
    notes = []
    if gpu["nouveau"]:
        notes.append("nouveau is loaded and must be blacklisted")
    if gpu["secure_boot"]:
        notes.append("Secure Boot is on, so the module must be signed (enrol the MOK key when asked)")
    extra = f" Note: {'; '.join(notes)}." if notes else ""
    return f"install {install}, then reboot.{extra} Or set nvidia_driver_install: true to let labfleet install it"


def _below_floor(settings: Settings, gpu: Mapping, distro: Mapping) -> str:
    found = gpu["driver"] or "none loaded"
    return (
        f"host {settings.host}: NVIDIA driver {found} is below {settings.nvidia_driver_min}, the floor for "
        f"CUDA {settings.cuda} (nvidia_driver_min); {driver_advice(settings, dict(distro), dict(gpu))}"
    )


@dataclass(frozen=True)
class DriverPlan:
    """How a host gets the distribution's driver branch (``nvidia_driver_install: true``).

    ``packages`` are installed with apt; ``ubuntu_drivers`` is the ``ubuntu-drivers
    install`` argument; ``installed_when`` is the package whose presence means it is done;
    ``components`` are enabled in the distribution's own sources first.
    """

    packages: tuple[str, ...] = ()
    ubuntu_drivers: str | None = None
    installed_when: str = ""
    components: tuple[str, ...] = ()


def driver_install_plan(settings: Settings, distro: str, arch: str, secure_boot: bool | None) -> DriverPlan | str:
    """The plan for this host, or why labfleet will not install the driver here."""
    branch = driver_branch(settings)
    if distro == "ubuntu":
        return DriverPlan(
            packages=("ubuntu-drivers-common",),
            ubuntu_drivers=f"nvidia:{branch}-server",
            installed_when=f"nvidia-driver-{branch}-server",
        )
    if secure_boot:
        return (
            f"host {settings.host}: Secure Boot is on, and Debian's nvidia-driver is a DKMS module that must be "
            "signed with a key enrolled at the console (mokutil --import /var/lib/dkms/mok.pub, then reboot and "
            "enrol it); labfleet does not automate that: install the driver by hand, or turn Secure Boot off"
        )
    return DriverPlan(
        packages=(f"linux-headers-{arch}", "nvidia-driver", "firmware-misc-nonfree"),
        installed_when="nvidia-driver",
        components=DEBIAN_DRIVER_COMPONENTS,
    )


_ONE_LINE = re.compile(r"^(\s*deb(?:-src)?\s+(?:\[[^\]]*\]\s+)?\S+\s+)(\S+)((?:\s+[^\s#]+)*)(\s*(?:#.*)?)$")


def add_components(text: str, path: str, suites: Iterable[str], components: Sequence[str]) -> str:
    """text with components added to the entries of suites that have ``main``; all else verbatim.

    + path: decides the format (``.sources`` is deb822, anything else one-line)
    """
    suites = set(suites)
    if path.endswith(".sources"):
        return _add_components_deb822(text, suites, components)
    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        match = _ONE_LINE.match(body)
        if match and match.group(2) in suites:
            present = match.group(3).split()
            missing = [c for c in components if c not in present]
            if "main" in present and missing:
                body = match.group(1) + match.group(2) + match.group(3) + " " + " ".join(missing) + match.group(4)
        lines.append(body + line[len(line.rstrip("\n")) :])
    return "".join(lines)


def _add_components_deb822(text: str, suites: set[str], components: Sequence[str]) -> str:
    stanzas = re.split(r"(\n[ \t]*\n)", text)
    for index in range(0, len(stanzas), 2):
        fields = {}
        for line in stanzas[index].splitlines():
            name, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "\t", "#")):
                fields[name.strip().lower()] = value.split()
        enabled = (fields.get("enabled") or ["yes"])[0].lower() != "no"
        present = fields.get("components", [])
        missing = [c for c in components if c not in present]
        if enabled and set(fields.get("suites", [])) & suites and "main" in present and missing:
            added = " ".join(missing)
            stanzas[index] = re.sub(
                r"(?im)^(components:[^\n#]*?)[ \t]*$",
                r"\g<1> " + added,
                stanzas[index],
                count=1,
            )
    return "".join(stanzas)


@operation(is_idempotent=True)
def enable_apt_components(path: str, suites: Sequence[str], components: Sequence[str]):
    """Add components to the entries of some suites in an existing apt sources file.

    + path: the file (deb822 ``.sources`` or one-line ``.list``/``sources.list``)
    + suites: the suites whose entries get the components, when they have ``main``
    + components: the components to add

    Everything else in the file (other entries, comments, order) is kept as it is.

    **Example:**

    .. code:: python

        enable_apt_components(name="Enable non-free", path="/etc/apt/sources.list.d/debian.sources",
                              suites=["trixie", "trixie-updates"], components=["non-free"])
    """
    lines = host.get_fact(FileContents, path=path)
    if lines is None:
        host.noop(f"{path} does not exist")
        return
    text = "\n".join(lines) + "\n"
    wanted = add_components(text, path, suites, components)
    if wanted == text:
        host.noop(f"{path} already has {' '.join(components)} where it has main")
        return
    yield FileUploadCommand(StringIO(wanted), path)
    yield f"chmod 644 {shlex.quote(path)}"


@operation(is_idempotent=True)
def install_ubuntu_driver(branch: str, installed_when: str):
    """Install an NVIDIA driver branch with ubuntu-drivers, unless its package is installed.

    + branch: the ubuntu-drivers name, e.g. ``nvidia:570-server``
    + installed_when: the package whose presence means the branch is installed

    **Example:**

    .. code:: python

        install_ubuntu_driver(name="Install the driver", branch="nvidia:570-server",
                              installed_when="nvidia-driver-570-server")
    """
    if installed_when in host.get_fact(DebPackages):
        host.noop(f"{installed_when} already installed")
        return
    yield apt.apt_update()
    yield f"DEBIAN_FRONTEND=noninteractive ubuntu-drivers install {shlex.quote(branch)}"


@operation(is_idempotent=True)
def check_loaded_driver(floor: str, problem: str):
    """Fail this host unless the driver loaded now (after a reboot, say) is at least floor.

    + floor: the lowest acceptable driver version
    + problem: what to tell the person when it is not

    **Example:**

    .. code:: python

        check_loaded_driver(name="Check the driver after the reboot", floor="570", problem="...")
    """
    driver = host.get_fact(GpuHost)["driver"]
    if driver_meets(driver, floor):
        host.noop(f"driver {driver} is loaded")
        return
    message = f"labfleet: the loaded NVIDIA driver is {driver or 'none'}; {problem}"
    yield f"echo {shlex.quote(message)} >&2; exit 1"


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


@deploy("Check the NVIDIA driver")
def check_driver(settings: Settings):
    """The driver floor on GPU hosts; with nvidia_driver_install, the driver itself."""
    if not has_gpu(settings):
        if wants_toolkit(settings):
            host.noop("no NVIDIA GPU on this host: no driver to check; the toolkit is installed (nvidia_toolkit: true)")
        else:
            plan_notice(
                explain_skip,
                name="Skip the NVIDIA steps: no NVIDIA GPU on this host",
                reason=(
                    "no NVIDIA GPU on this host (gpu: auto found none, or gpu: false): the NVIDIA driver check, "
                    "toolkit and runtime are skipped (nvidia_toolkit: true installs the toolkit before a GPU arrives)"
                ),
            )
        return
    gpu = gpu_state()
    title = f"Check that the NVIDIA driver is at least {settings.nvidia_driver_min}"
    if driver_meets(gpu["driver"], settings.nvidia_driver_min):
        require(name=title, ok=True, problem="")
    elif settings.nvidia_driver_install:
        _install_driver(settings, gpu, title)
    else:
        require(name=title, ok=False, problem=_below_floor(settings, gpu, host.get_fact(LinuxDistribution) or {}))


def _install_driver(settings: Settings, gpu: Mapping, title: str):
    release, arch, *sources = host.get_fact(
        FactBatch,
        parts=((LinuxDistribution, {}), (DebArch, {}), *((FileContents, {"path": path}) for path in DEBIAN_SOURCES)),
    )
    try:
        distro, codename, _ = docker.distribution(release)
        plan = driver_install_plan(settings, distro, arch, gpu["secure_boot"])
    except docker.UnsupportedDistribution as error:
        plan = f"host {settings.host}: {error}; labfleet installs NVIDIA drivers on Debian and Ubuntu only"
    if isinstance(plan, str):
        require(name=title, ok=False, problem=f"{_below_floor(settings, gpu, release)}. {plan}")
        return
    changed_sources = [
        enable_apt_components(
            name=f"Enable {' '.join(plan.components)} in {path}",
            path=path,
            suites=(codename, f"{codename}-updates", f"{codename}-security"),
            components=plan.components,
        )
        for path, lines in zip(DEBIAN_SOURCES, sources, strict=True)
        if plan.components and lines is not None
    ]
    packages = apt.ensure_packages(
        name=f"Install {', '.join(plan.packages)}",
        packages=plan.packages,
        refresh=lambda: any(op.did_change() for op in changed_sources),
    )
    driver = packages
    if plan.ubuntu_drivers:
        driver = install_ubuntu_driver(
            name=f"Install the NVIDIA driver {plan.ubuntu_drivers} with ubuntu-drivers",
            branch=plan.ubuntu_drivers,
            installed_when=plan.installed_when,
        )
    server.reboot(name="Reboot into the new NVIDIA driver", reboot_timeout=900, _if=driver.did_change)
    check_loaded_driver(
        name=f"{title} (after installing it)",
        floor=settings.nvidia_driver_min,
        problem=(
            f"labfleet installed {plan.installed_when}, and the driver loaded now is still below "
            f"{settings.nvidia_driver_min}, the floor for CUDA {settings.cuda}: the distribution's branch may be "
            "older than that (set nvidia_driver_min, or use NVIDIA's CUDA repository), or the host needs a reboot "
            "(and, with Secure Boot, the module's key enrolled)"
        ),
    )


# --- The Container Toolkit -------------------------------------------------------------


def toolkit_packages(settings: Settings) -> tuple[str, ...]:
    """The four toolkit packages, each ``=nvidia_toolkit_version`` when that is set."""
    version = settings.nvidia_toolkit_version
    return tuple(f"{name}={version}" if version else name for name in TOOLKIT_PACKAGES)


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


def sources_file(settings: Settings, arch: str) -> str:
    """The text of /etc/apt/sources.list.d/nvidia-container-toolkit.sources."""
    return apt.deb822_source(
        uris=repository_url(settings, arch),
        suites="/",
        components=None,
        architectures=arch,
        signed_by=KEYRING,
        comment="NVIDIA Container Toolkit; written by labfleet (nvidia_toolkit_apt_mirror, nvidia_toolkit_apt_key).",
    )


def pin_file(settings: Settings) -> str | None:
    if settings.nvidia_toolkit_version is None:
        return None
    return apt.pin_preferences(
        TOOLKIT_PACKAGES,
        settings.nvidia_toolkit_version,
        comment="Written by labfleet (nvidia_toolkit_version): the four toolkit packages move together.",
    )


def repository_markers(settings: Settings) -> tuple[str, ...]:
    mirror = settings.nvidia_toolkit_apt_mirror.split("://", 1)[-1]
    return tuple(dict.fromkeys((NVIDIA_REPOSITORY, mirror + "/")))


def stale_toolkit_files(entries: Mapping) -> tuple[list[str], list[str]]:
    """``(to_remove, mixed)``: NVIDIA's apt source files other than labfleet's (NVIDIA's guide
    writes nvidia-container-toolkit.list, and two Signed-By values for one repository make
    apt fail), and files that mix them with other repositories (left alone, reported)."""
    remove, mixed = [], []
    for entry in entries["files"]:
        if entry["path"] == SOURCES_FILE:
            continue
        if entry["matching"] == entry["entries"] and entry["path"] != "/etc/apt/sources.list":
            remove.append(entry["path"])
        else:
            mixed.append(entry["path"])
    return remove, mixed


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@deploy("Install the NVIDIA Container Toolkit")
def install_container_toolkit(settings: Settings) -> OperationMeta | None:
    """NVIDIA's signed apt repository and the four toolkit packages; returns the install
    operation (for ``configure_container_runtime``), or None when nothing is installed."""
    if not wants_toolkit(settings):
        host.noop("no NVIDIA GPU on this host: the NVIDIA Container Toolkit is skipped")
        return None
    release, arch, installed, entries = host.get_fact(
        FactBatch,
        parts=(
            (LinuxDistribution, {}),
            (DebArch, {}),
            (DebPackages, {}),
            (AptSourceEntries, {"markers": repository_markers(settings), "paths": (KEYRING, PIN_FILE, SOURCES_FILE)}),
        ),
    )
    stale, mixed = stale_toolkit_files(entries)
    problems = []
    try:
        docker.distribution(release)
    except docker.UnsupportedDistribution as error:
        problems.append(f"host {settings.host}: {error}; labfleet installs NVIDIA's toolkit on Debian and Ubuntu")
    if mixed:
        problems.append(
            f"host {settings.host}: {', '.join(mixed)} mixes NVIDIA's toolkit apt entries with other repositories'; "
            f"labfleet does not edit other repositories' files: move NVIDIA's entries out (labfleet writes "
            f"{SOURCES_FILE}), then run the deploy again"
        )
    require(
        name="Check that the NVIDIA Container Toolkit can be installed here",
        ok=not problems,
        problem="; ".join(problems),
    )
    if problems:
        return None

    planned = [files.file(name=f"Remove NVIDIA's stale apt file {path}", path=path, present=False) for path in stale]
    prerequisites = ["ca-certificates"] + ([] if {"curl", "wget"} & set(installed) else ["curl"])
    if apt.missing_packages(prerequisites, installed):
        planned.append(apt.ensure_packages(name="Install ca-certificates and curl", packages=prerequisites))
    # Always planned: only the host can tell whether the served key changed.
    keyring = apt.install_keyring(name="Install NVIDIA's repository key", url=key_url(settings), path=KEYRING)
    wanted = {SOURCES_FILE: ("Add NVIDIA's Container Toolkit apt repository", sources_file(settings, arch))}
    pin = pin_file(settings)
    if pin is not None:
        wanted[PIN_FILE] = (f"Pin the NVIDIA Container Toolkit to {settings.nvidia_toolkit_version}", pin)
    sources = [
        files.put(name=title, src=StringIO(text), dest=path, mode="644")
        for path, (title, text) in wanted.items()
        if entries["sha256"].get(path) != _sha256(text)
    ]
    if pin is None and PIN_FILE in entries["present"]:
        sources.append(files.file(name="Remove the toolkit's old version pin", path=PIN_FILE, present=False))
    packages = toolkit_packages(settings)
    if not (apt.missing_packages(packages, installed) or planned or sources):
        host.noop(f"{', '.join(TOOLKIT_PACKAGES)} already installed")
        return None
    return apt.ensure_packages(
        name="Install the NVIDIA Container Toolkit packages",
        packages=packages,
        refresh=lambda: any(op.did_change() for op in [*sources, keyring]),
    )


# --- The runtime in Docker ---------------------------------------------------------------


def exec_opts_with_cgroupfs(current) -> list[str]:
    """daemon.json's exec-opts with Docker's cgroupfs driver: other options are kept, in order."""
    opts = [opt for opt in current if isinstance(opt, str)] if isinstance(current, list) else []
    if CGROUPFS in opts and not any(o.startswith("native.cgroupdriver=") and o != CGROUPFS for o in opts):
        return opts
    return [opt for opt in opts if not opt.startswith("native.cgroupdriver=")] + [CGROUPFS]


def daemon_keys(settings: Settings) -> dict:
    """The daemon.json keys of the NVIDIA runtime, for the docker step's one merge.

    The runtime entry is what ``nvidia-ctk runtime configure`` would write, so a host
    set up by hand by NVIDIA's guide reads as unchanged. The cgroupfs driver keeps GPUs
    in containers across ``systemctl daemon-reload`` (see the module docstring).
    """
    if not wants_toolkit(settings):
        return {}
    current = host.get_fact(DaemonJson, path=docker.DAEMON_JSON)
    keys: dict = {
        "runtimes": {"nvidia": {"path": RUNTIME, "args": []}},
        "exec-opts": exec_opts_with_cgroupfs((current["config"] or {}).get("exec-opts")),
    }
    if settings.nvidia_default_runtime:
        keys["default-runtime"] = "nvidia"
    return keys


def cdi_spec_is_current(driver: str | None, state: Mapping) -> bool:
    """No driver loaded: nothing to describe. Otherwise the spec must exist and be for this driver."""
    return driver is None or (state["spec"] and state["spec_driver"] == driver)


def dockerd_predates_hook(state: Mapping) -> bool:
    """dockerd is running and became active before the NVIDIA hook was installed."""
    started, hook = state["service_started"], state["hook_changed"]
    return started is not None and hook is not None and started < hook


def _runtime_state() -> dict:
    return host.get_fact(NvidiaRuntimeState, spec=CDI_SPEC, marker=CDI_MARKER, hook=HOOK, service=docker.DOCKER_SERVICE)


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
    state = host.get_fact(NvidiaRuntimeState, spec=spec, marker=marker, hook=HOOK, service=docker.DOCKER_SERVICE)
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


@deploy("Configure the NVIDIA runtime")
def configure_container_runtime(settings: Settings, toolkit: OperationMeta | None = None):
    """After the docker step: dockerd aware of the toolkit, the CDI spec, nvidia-cdi-refresh.

    + toolkit: what ``install_container_toolkit`` returned
    """
    if not wants_toolkit(settings):
        host.noop("no NVIDIA GPU on this host: the NVIDIA runtime is not configured")
        return
    if toolkit is not None:
        docker.restart_service(
            name="Restart dockerd so that it registers NVIDIA's GPU driver",
            service=docker.DOCKER_SERVICE,
            _if=[toolkit.did_change, lambda: dockerd_predates_hook(_runtime_state())],
        )
    state, refresh = host.get_fact(
        FactBatch,
        parts=(
            (
                NvidiaRuntimeState,
                {"spec": CDI_SPEC, "marker": CDI_MARKER, "hook": HOOK, "service": docker.DOCKER_SERVICE},
            ),
            (ServiceState, {"service": CDI_REFRESH_UNIT}),
        ),
    )
    # A driver installed by this run changes the driver the spec must describe.
    if toolkit is not None or settings.nvidia_driver_install or not cdi_spec_is_current(gpu_state()["driver"], state):
        generate_cdi_spec(name="Generate the CDI spec for the loaded driver")
    if toolkit is not None or (
        docker.unit_exists(refresh) and (refresh["enabled"], refresh["active"]) != ("enabled", "active")
    ):
        docker.ensure_service(
            name=f"Enable {CDI_REFRESH_UNIT} where the toolkit has it", service=CDI_REFRESH_UNIT, if_present=True
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
    result = host.get_fact(GpuInContainer, image=image, gpus=gpus)
    problem = gpu_check_problem(result)
    if problem is None:
        gpus_seen = [line for line in result["output"] if line.startswith("GPU ")]
        host.noop(f"{len(gpus_seen)} GPU(s) visible in {image}; smoke test passed")
        return
    output = "\n".join(result["output"][-40:])
    message = f"labfleet: {problem}: docker run --rm --gpus {gpus} {image} printed:\n{output}"
    yield f"echo {shlex.quote(message)} >&2; exit 1"


@deploy("Check the GPU in the lab image")
def verify_gpu(settings: Settings):
    if not has_gpu(settings):
        host.noop("no NVIDIA GPU on this host: the GPU check is skipped")
        return
    check_gpu_in_container(
        name="Check that the lab image sees the GPU (nvidia-smi and the smoke test)",
        image=image_tag(settings),
        gpus=gpus_flag(settings.gpu_devices),
    )
