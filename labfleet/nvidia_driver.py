"""The NVIDIA driver on GPU hosts: the floor, reboots, Secure Boot, the hold, and installing it.

On a GPU host (``gpu``, or detection: PCI vendor 10de or /proc/driver/nvidia), in this order:

- **Secure Boot.** Secure Boot on (``mokutil --sb-state``, else the EFI variable) and no NVIDIA
  module loaded: the kernel refuses a module not signed by an enrolled key, so the host stops
  with the cause and the ``mokutil`` enrolment steps, before anything else.
- **Reboot needed.** The loaded module (/proc/driver/nvidia/version, else
  /sys/module/nvidia/version) differs from the installed user space (the version in the name
  of libnvidia-ml.so, which NVML compares with the module): every container would fail with
  "Failed to initialize NVML: Driver/library version mismatch". The deploy says "pc03 runs
  module 565.57.01 but 570.86.15 is installed: reboot pc03", the GPU check is skipped there
  (labfleet.nvidia.verify_gpu), and ``./run status`` shows "reboot needed". With
  ``nvidia_driver_install`` labfleet reboots the host itself, but only while no JupyterLab
  container is busy (the update step's busy check, labfleet-busy), and never the machine
  that runs the deploy (``@local``): there it says to reboot by hand and run again. It
  reboots once per installed release (the reboot's command writes the release to
  /var/lib/labfleet/nvidia/rebooted-for): a module that still differs after that reboot (a
  failed DKMS build, a module the kernel refuses) stops the host with what to look at, instead
  of rebooting it on every scheduled deploy.
- **The floor.** A driver older than ``nvidia_driver_min`` (by default the floor of the
  ``cuda`` line, one rule: NVIDIA's minor-version compatibility, labfleet.model) stops that
  host alone with what to install; Blackwell GPUs (PCI id 0x2900 and up) need 570 or newer
  with NVIDIA's open kernel modules, checked apart.
- **Installing** (``nvidia_driver_install: true``). apt's candidate (``apt-cache policy``,
  read while planning) is compared with the floor *before* anything is installed: Debian's
  own driver (535 on 12, 550 on 13) cannot reach the CUDA 13 floor or drive Blackwell, and
  installing it would reboot into a host that fails on every run, so labfleet refuses and
  says what to do instead. Ubuntu gets a branch NVIDIA still supports, at or above the
  floor (platform.supported_branch; R580 in December 2026, R535 and R570 having ended), in
  its ``-open`` flavour unless a GPU is older than Turing. The generation is known before a
  driver is loaded from the PCI device id in sysfs (platform.open_kernel_modules): the
  open modules drive Turing and newer only (they need the GSP), and NVIDIA made them the
  default in R560; a host with no readable id gets the open default. Debian gets
  ``nvidia-driver`` with ``libcuda1`` and ``nvidia-smi`` (only recommended, so
  ``--no-install-recommends`` left torch without CUDA) and the DKMS module of the flavour.
- **The next boot.** The newest installed kernel, which a reboot starts, without an NVIDIA
  module (Ubuntu's signed modules for a new kernel need the archive's newer driver, which the
  hold keeps out; or DKMS failed): the deploy warns before that reboot loses the GPU.
- **Held.** The driver's packages (every installed binary of its source packages, and what
  labfleet installs) are held by an apt preferences pin, /etc/apt/preferences.d/labfleet-
  nvidia-driver, at ``nvidia_driver_version`` or else at the release installed. A pin at
  priority 1001 makes that release apt's candidate, so ``apt upgrade``, ``apt-get upgrade``
  and unattended-upgrades (which installs apt's candidates) all leave it; an
  unattended-upgrades blacklist would stop only unattended-upgrades, and ``apt-mark hold``
  breaks every later ``apt-get install`` of the package. The pin names the release
  (``580.95.05-*``), so a packaging revision of the same release may still come, and never
  a user space that differs from the loaded module. labfleet moves the driver only when
  ``nvidia_driver_version`` or ``nvidia_driver_install`` asks (apt.hold_packages writes the
  pin, as it writes the toolkit's).

It runs first among the NVIDIA steps (deploy.py), before the toolkit (labfleet.nvidia).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from pyinfra import host, logger
from pyinfra.api import StringCommand, operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.operations import files, server

from labfleet import apt, compose, docker, planning, platform
from labfleet.facts.nvidia import GpuHost
from labfleet.facts.nvidia_driver import (
    REBOOT_MARKER,
    AptPolicy,
    AptVersions,
    DriverState,
    NvidiaDriver,
    installed_driver,
    newest_kernel_without_module,
    upstream_version,
)
from labfleet.facts.updates import ContainerBusy
from labfleet.model import release_key
from labfleet.nvidia import NvidiaHost, explain_skip, has_gpu, snapshot, wants_toolkit
from labfleet.planning import Read, step
from labfleet.preflight import require
from labfleet.settings import Settings

PIN_FILE = f"{apt.PREFERENCES_DIR}/labfleet-nvidia-driver"
PIN_COMMENT = (
    "Written by labfleet: the NVIDIA driver stays at this release against apt upgrade and "
    "unattended-upgrades; nvidia_driver_version moves it."
)
# What the install compares with the floor before installing: Debian's package, and
# Ubuntu's per branch and flavour.
CANDIDATES = (
    "nvidia-driver",
    *(f"nvidia-driver-{branch}-server{open_}" for branch in platform.DRIVER_BRANCHES for open_ in ("-open", "")),
)
LOCAL = "@local"


def driver_meets(driver: str | None, floor: str) -> bool:
    """True when driver >= floor; "570" means any 570.x."""
    return driver is not None and release_key(driver) >= release_key(floor)


def today() -> date:
    """The controller's date, which decides which NVIDIA branches are still supported."""
    return date.today()


def is_controller(settings: Settings) -> bool:
    """The host is the machine that runs the deploy: rebooting it would end the run."""
    return settings.host.startswith(LOCAL)


# --- What the driver step reads ------------------------------------------------------------


@dataclass(frozen=True)
class DriverHost:
    """What the driver step decides from besides NvidiaHost, read in deploy.py's one batch."""

    driver: DriverState
    pin: list[str] | None
    policy: dict[str, AptVersions] | None = None


def reads(settings: Settings) -> dict[str, Read]:
    """The driver, the hold, and with nvidia_driver_install apt's candidates; nothing with gpu: false."""
    if settings.gpu is False:
        return {}
    found = {"driver": Read(NvidiaDriver), "pin": Read(FileContents, {"path": PIN_FILE})}
    if settings.nvidia_driver_install:
        found["policy"] = Read(AptPolicy, {"packages": CANDIDATES})
    return found


def driver_snapshot(settings: Settings) -> DriverHost:
    return planning.snapshot(DriverHost, reads(settings))


# --- Messages --------------------------------------------------------------------------------


def ubuntu_branch(settings: Settings, blackwell: bool) -> str:
    """The branch to name or install on Ubuntu: nvidia_driver_version's, else a supported one."""
    if settings.nvidia_driver_version:
        return settings.nvidia_driver_version.split(".")[0]
    floor = max(settings.nvidia_driver_min, platform.BLACKWELL_MIN_DRIVER if blackwell else "0", key=release_key)
    return platform.supported_branch(floor, today()) or floor.split(".")[0]


def driver_advice(settings: Settings, release: Mapping, gpu: Mapping, devices: Sequence[int] = ()) -> str:
    """What to install, in the words of this host's distribution.

    + devices: the GPUs' PCI device ids (NvidiaDriver): Blackwell raises the branch, and a
      pre-Turing GPU needs the proprietary flavour
    """
    branch = ubuntu_branch(settings, bool(platform.blackwell_devices(devices)))
    install = platform.driver_install_hint(release.get("name") or "", branch, platform.open_kernel_modules(devices))
    notes = []
    if gpu["nouveau"]:
        notes.append("nouveau is loaded and must be blacklisted")
    if gpu["secure_boot"]:
        notes.append("Secure Boot is on, so the module must be signed (enrol the MOK key when asked)")
    extra = f" Note: {'; '.join(notes)}." if notes else ""
    return f"install {install}, then reboot.{extra} Or set nvidia_driver_install: true to let labfleet install it"


def _below_floor(
    settings: Settings, gpu: Mapping, release: Mapping, devices: Sequence[int], found: str | None = None
) -> str:
    found = found or gpu["driver"] or "none loaded"
    return (
        f"host {settings.host}: NVIDIA driver {found} is below {settings.nvidia_driver_min}, the floor for "
        f"CUDA {settings.cuda} (nvidia_driver_min); {driver_advice(settings, release, gpu, devices)}"
    )


def secure_boot_problem(settings: Settings, installed: str | None) -> str:
    """Secure Boot on and no module loaded: the cause and the enrolment steps."""
    enrol = (
        "enrol the key DKMS signs with: sudo mokutil --import /var/lib/dkms/mok.pub (choose a one-time password), "
        "reboot, and at the blue MOK manager choose Enroll MOK, Continue, Yes and that password"
    )
    if installed:
        return (
            f"host {settings.host}: Secure Boot is on and NVIDIA driver {installed} is installed but no NVIDIA kernel "
            "module is loaded: the kernel loads only modules signed by a key it trusts. To load a DKMS-built module, "
            f"{enrol}; then run the deploy again (or use signed modules: Ubuntu's linux-modules-nvidia-* that "
            f"ubuntu-drivers installs; or turn Secure Boot off in {settings.host}'s firmware). If {settings.host} "
            "has not rebooted since the driver was installed, reboot it first: the module may only be waiting for it"
        )
    return (
        f"host {settings.host}: Secure Boot is on and no NVIDIA driver is installed: the kernel will load only a "
        "module signed by a key it trusts. Install one with signed modules (Ubuntu: sudo ubuntu-drivers install, "
        "Canonical's linux-modules-nvidia-*; or set nvidia_driver_install: true), or, for a DKMS-built module "
        f"(Debian), install it and {enrol}; then run the deploy again"
    )


def reboot_line(host_name: str, module: str | None, installed: str) -> str:
    if module is None:
        return f"{host_name} has NVIDIA driver {installed} installed but no NVIDIA module loaded: reboot {host_name}"
    return f"{host_name} runs module {module} but {installed} is installed: reboot {host_name}"


def rebooted_problem(settings: Settings, module: str | None, installed: str) -> str:
    """labfleet rebooted for this release already and the module still differs: another reboot will not help."""
    name = settings.host
    still = f"module {module} is still loaded" if module else "the NVIDIA module still does not load"
    return (
        f"host {name}: labfleet rebooted {name} for NVIDIA driver {installed} and {still}, so it does not reboot "
        f"again: see sudo dkms status, sudo journalctl -k | grep -i nvidia and mokutil --sb-state on {name}; "
        "fix the cause, reboot it by hand, and run the deploy again"
    )


def kernel_line(settings: Settings, release: Mapping, kernel: str) -> str:
    """The newest kernel, which a reboot boots, has no NVIDIA module: what follows, and what to do.

    On Ubuntu, Canonical's signed modules for a new kernel require the driver release its
    archive has then, which a held driver is not; on Debian, DKMS failed to build for it.
    """
    if "ubuntu" in (release.get("name") or "").lower():
        fix = (
            "Ubuntu's signed NVIDIA modules for it need the driver release its archive has now, newer than the "
            "one held: set nvidia_driver_version to that release (apt-cache policy lists it) with "
            "nvidia_driver_install = true, and deploy before rebooting"
        )
    else:
        fix = f"DKMS did not build it: see sudo dkms status, then sudo dkms autoinstall -k {kernel} on {settings.host}"
    return (
        f"{settings.host}: kernel {kernel}, the newest installed and the one a reboot starts, has no NVIDIA "
        f"module, so after the next reboot the GPU is gone; {fix}"
    )


def blackwell_problem(settings: Settings, devices: Sequence[int], module: str | None, flavour: str | None) -> str:
    ids = ", ".join(f"0x{device:04x}" for device in devices)
    return (
        f"host {settings.host}: NVIDIA Blackwell GPU (PCI device {ids}) needs driver "
        f"{platform.BLACKWELL_MIN_DRIVER} or newer with NVIDIA's open kernel modules; loaded: {module or 'none'}"
        f"{f' ({flavour})' if module else ''}: install nvidia-driver-{ubuntu_branch(settings, True)}-server-open "
        "(Ubuntu) or NVIDIA's open driver from its CUDA repository, then reboot"
    )


def candidate_problem(settings: Settings, release: platform.Distribution, candidate: str, floor: str) -> str:
    """The distribution's driver cannot reach the floor: say so before installing it, and what instead."""
    name = f"{release.id.capitalize()} {release.major or release.codename}"
    return (
        f"host {settings.host}: {name}'s own NVIDIA driver is {candidate}, below {floor} (the floor for CUDA "
        f"{settings.cuda}, or what the GPU needs), so labfleet does not install it (it would reboot into a host "
        "that still fails): install NVIDIA's driver from NVIDIA's CUDA repository by hand (NVIDIA's driver "
        "installation guide), or choose a cuda line whose floor it meets (12.x needs 525.60.13), or lower "
        "nvidia_driver_min"
    )


def driver_install_plan(
    settings: Settings, release: platform.Distribution, arch: str, secure_boot: bool | None, devices: Sequence[int]
) -> platform.DriverPlan | str:
    """The plan for this host (platform.nvidia_driver), or why labfleet will not install the driver here."""
    blackwell = bool(platform.blackwell_devices(devices))
    open_modules = platform.open_kernel_modules(devices)
    if blackwell and not open_modules:
        return (
            f"host {settings.host}: a Blackwell GPU needs NVIDIA's open kernel modules and an older GPU in the same "
            "host cannot run them; put the cards in different hosts"
        )
    branch = ubuntu_branch(settings, blackwell)
    if release.id == "ubuntu" and not settings.nvidia_driver_version and branch not in platform.DRIVER_BRANCHES:
        return (
            f"host {settings.host}: no NVIDIA driver branch labfleet knows of is supported on {today()} and at least "
            f"{settings.nvidia_driver_min} (platform.DRIVER_BRANCHES); set nvidia_driver_version, or install by hand"
        )
    plan = platform.nvidia_driver(release, arch, branch, open_modules)
    if isinstance(plan, str):
        return f"host {settings.host}: {plan}"
    if secure_boot and not plan.signed_modules:
        return (
            f"host {settings.host}: Secure Boot is on, and Debian's nvidia-driver is a DKMS module that must be "
            "signed with a key enrolled at the console (mokutil --import /var/lib/dkms/mok.pub, then reboot and "
            "enrol it); labfleet does not automate that: install the driver by hand, or turn Secure Boot off"
        )
    return plan


def candidate_release(
    plan: platform.DriverPlan, policy: Mapping[str, AptVersions] | None, held: bool = False
) -> str | None:
    """The release apt would install for the plan: its candidate, else what the release is known to carry.

    + held: labfleet's own pin holds the driver now, so apt's candidate is the held release;
      the install lifts that hold first, and then the newest release in apt's table is the one
    """
    found = (policy or {}).get(plan.installed_when)
    if found and held and found["versions"]:
        return max((upstream_version(v) for v in found["versions"]), key=release_key)
    if found and found["candidate"]:
        return upstream_version(found["candidate"])
    return plan.release_driver


@operation(is_idempotent=True)
def install_driver_packages(packages: Sequence[str], version: str | None = None):
    """Install the driver's packages, at the release version when one is pinned.

    + packages: the packages (the driver first: its candidate is checked against version)
    + version: the NVIDIA release the pin file holds (``580.95.05``); None: apt's candidate

    The pin file (/etc/apt/preferences.d/labfleet-nvidia-driver) is written first, so apt's
    candidate is the pinned release; the install moves installed packages to it too
    (``--allow-downgrades`` for a lower pin). When apt has no such release after the update,
    the host stops before anything is installed.

    **Example:**

    .. code:: python

        install_driver_packages(name="Install the driver", packages=["nvidia-driver", "libcuda1"], version="580.95.05")
    """
    installed = host.get_fact(DebPackages)
    wrong = [
        name
        for name in packages
        if not installed.get(name)
        or (version is not None and all(upstream_version(v) != version for v in installed[name]))
    ]
    if not wrong:
        host.noop(f"{', '.join(packages)} already installed" + (f" at {version}" if version else ""))
        return
    yield apt.apt_update()
    if version is not None:
        missing = shlex.quote(
            f"labfleet: apt offers no {packages[0]} {version} on this host (nvidia_driver_version); "
            f"apt-cache policy {packages[0]} lists what it has"
        )
        yield (
            f"LC_ALL=C apt-cache policy {shlex.quote(packages[0])} | grep -q "
            f"{shlex.quote('Candidate: ' + version + '-')} || {{ echo {missing} >&2; exit 1; }}"
        )
    yield apt.apt_get(f"install --no-install-recommends --allow-downgrades {' '.join(shlex.quote(p) for p in wrong)}")


@operation(is_idempotent=True)
def install_ubuntu_driver(branch: str, installed_when: str, version: str | None = None):
    """Install an NVIDIA driver branch with ubuntu-drivers, unless its package is installed.

    + branch: the ubuntu-drivers name, e.g. ``nvidia:580-server-open``
    + installed_when: the package whose presence means the branch is installed
    + version: the release the pin holds; an installed package of another release is moved to it

    **Example:**

    .. code:: python

        install_ubuntu_driver(name="Install the driver", branch="nvidia:580-server-open",
                              installed_when="nvidia-driver-580-server-open")
    """
    versions = host.get_fact(DebPackages).get(installed_when) or []
    if versions and (version is None or any(upstream_version(v) == version for v in versions)):
        host.noop(f"{installed_when} already installed")
        return
    yield apt.apt_update()
    yield f"DEBIAN_FRONTEND=noninteractive ubuntu-drivers install {shlex.quote(branch)}"
    if version is not None:
        yield apt.apt_get(f"install --no-install-recommends --allow-downgrades {shlex.quote(installed_when)}")


def pin_text(packages: Iterable[str], release: str) -> str:
    """The hold as apt.hold_packages writes it: every driver package at release (any packaging revision)."""
    return apt.hold_preferences(apt.held_versions(sorted(set(packages)), {}, release), PIN_COMMENT)


def held_release(settings: Settings, driver: DriverState) -> str | None:
    return settings.nvidia_driver_version or installed_driver(driver)


@operation(is_idempotent=True)
def hold_driver(packages: Sequence[str] = (), version: str | None = None, path: str = PIN_FILE):
    """Hold the NVIDIA driver's packages at one release against apt upgrade and unattended-upgrades.

    + packages: packages to hold besides the installed ones of the driver's sources
    + version: the release to hold (nvidia_driver_version); None: the release installed now
    + path: the apt preferences file

    Read when it runs, so packages that the install of this run added are held as well.

    **Example:**

    .. code:: python

        hold_driver(name="Hold the NVIDIA driver", packages=["nvidia-driver", "libcuda1"])
    """
    driver = host.get_fact(NvidiaDriver)
    release = version or installed_driver(driver)
    names = set(driver["packages"]) | (set(packages) if version else set())
    if release is None or not names:
        host.noop("no NVIDIA driver package is installed: nothing to hold")
        return
    yield from apt.hold_packages._inner(sorted(names), path, PIN_COMMENT, release=release)


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


def busy_work(containers: Sequence[str], idle_seconds: int) -> list[str]:
    """What keeps any of the JupyterLab containers busy (the update step's busy check), read now."""
    reasons = []
    for container in containers:
        found = host.get_fact(ContainerBusy, container=container, idle_seconds=idle_seconds)
        reasons += [f"{container}: {reason}" for reason in found["reasons"]] if found["busy"] else []
    return reasons


def remember_reboot(reboot: StringCommand, release: str, marker: str = REBOOT_MARKER) -> StringCommand:
    """pyinfra's reboot command, writing first which installed release it reboots for.

    One command: the marker exists only if the reboot was started, and the reboot only once
    the marker is written, so the next deploy knows that this release had its reboot.
    """
    directory = marker.rsplit("/", 1)[0]
    write = (
        f"mkdir -p {shlex.quote(directory)} && printf '%s\\n' {shlex.quote(release)} > {shlex.quote(marker + '.new')} "
        f"&& mv {shlex.quote(marker + '.new')} {shlex.quote(marker)}"
    )
    return StringCommand(write, "&&", "(", reboot, ")")


@operation(is_idempotent=False)
def reboot_when_idle(
    reason: str, containers: Sequence[str], idle_seconds: int, reboot_timeout: int = 900, marker: str = REBOOT_MARKER
):
    """Reboot the host into its installed NVIDIA driver, unless a JupyterLab container is busy.

    + reason: why the host needs the reboot, for the output
    + containers: the JupyterLab containers whose work a reboot would kill
    + idle_seconds: the idle window of the busy check (jupyter_update_idle)
    + reboot_timeout: how long to wait for the host to come back
    + marker: the file that records the installed release rebooted for (read by NvidiaDriver)

    A busy container defers the reboot: the run says what keeps it busy, the host keeps
    running the old module (the GPU check is skipped there), and the next deploy tries again.
    The release is read when the reboot runs (after this run's install, if any) and written to
    marker in the reboot's command, so a module that never loads costs one reboot, not one per
    deploy (check_driver stops that host instead).

    **Example:**

    .. code:: python

        reboot_when_idle(name="Reboot into the new driver", reason="pc03 runs module 565.57.01 but ...",
                         containers=["labfleet-alice-jupyterlab-1"], idle_seconds=1800)
    """
    busy = busy_work(containers, idle_seconds)
    if busy:
        line = f"{reason}; the reboot waits for running work ({'; '.join(busy)}): run the deploy again once it is done"
        logger.warning(f"{host.print_prefix}{line}")
        host.noop(line)
        return
    release = installed_driver(host.get_fact(NvidiaDriver))
    for command in server.reboot._inner(delay=10, interval=1, reboot_timeout=reboot_timeout):
        # pyinfra's one shell command is the reboot itself; the rest run on the controller.
        if release is not None and isinstance(command, StringCommand):
            command = remember_reboot(command, release, marker)
        yield command


def _containers(settings: Settings) -> list[str]:
    return [compose.container_name(compose.project_name(user.name)) for user in settings.jupyter_users]


def plan_reboot(settings: Settings, reason: str, when=None) -> OperationMeta:
    """Reboot when no container is busy; on the controller itself, stop with what to do instead.

    + when: a callable for ``_if`` (the install changed the driver); None: the reboot is due now
    """
    extra = {"_if": when} if when is not None else {}
    if is_controller(settings):
        return refuse_reboot(
            name="Reboot into the installed NVIDIA driver (not this machine: it runs the deploy)",
            reason=(
                f"{reason}; labfleet does not reboot the machine that runs the deploy: reboot it by hand "
                "(sudo reboot), then run the deploy again"
            ),
            **extra,
        )
    return reboot_when_idle(
        name="Reboot into the installed NVIDIA driver once no container is busy",
        reason=reason,
        containers=_containers(settings),
        idle_seconds=settings.jupyter_update_idle,
        **extra,
    )


@operation(is_idempotent=True)
def refuse_reboot(reason: str):
    """Stop this host, which needs a reboot that labfleet will not do (it is the controller).

    + reason: what happened and what to do

    **Example:**

    .. code:: python

        refuse_reboot(name="Reboot (not this machine)", reason="... reboot it by hand, then run again")
    """
    yield f"echo {shlex.quote('labfleet: ' + reason)} >&2; exit 1"


@step("Check the NVIDIA driver")
def check_driver(settings: Settings):
    """Secure Boot, a reboot still due, the floor, Blackwell, a next kernel without a module; with
    nvidia_driver_install the driver itself; the hold."""
    if not has_gpu(settings):
        if wants_toolkit(settings):
            host.noop("no NVIDIA GPU on this host: no driver to check; the toolkit is installed (nvidia_toolkit: true)")
        else:
            planning.notice(
                explain_skip,
                name="Skip the NVIDIA steps: no NVIDIA GPU on this host",
                reason=(
                    "no NVIDIA GPU on this host (gpu: auto found none, or gpu: false): the NVIDIA driver check, "
                    "toolkit and runtime are skipped (nvidia_toolkit: true installs the toolkit before a GPU arrives)"
                ),
            )
        return
    state, mine = snapshot(settings), driver_snapshot(settings)
    driver = mine.driver
    module = driver["module"] or state.gpu["driver"]
    installed = installed_driver(driver)
    secure_boot = driver["secure_boot"] if driver["secure_boot"] is not None else state.gpu["secure_boot"]
    title = f"Check that the NVIDIA driver is at least {settings.nvidia_driver_min}"

    if secure_boot and module is None and (installed or not settings.nvidia_driver_install):
        require(
            name="Check that Secure Boot lets the NVIDIA module load",
            ok=False,
            problem=secure_boot_problem(settings, installed),
        )
        return
    moves = settings.nvidia_driver_version is not None and installed != settings.nvidia_driver_version
    if settings.nvidia_driver_install and (moves or not driver_meets(installed or module, settings.nvidia_driver_min)):
        _install_driver(settings, state, mine, title, secure_boot)
        return
    if installed is not None and module != installed:
        _reboot_needed(settings, state, driver, module, installed, title)
    elif driver_meets(module, settings.nvidia_driver_min):
        require(name=title, ok=True, problem="")
        blackwell = platform.blackwell_devices(driver["devices"])
        require(
            name="Check that Blackwell GPUs have driver 570 or newer with the open kernel modules",
            ok=not blackwell
            or (driver_meets(module, platform.BLACKWELL_MIN_DRIVER) and driver["flavour"] != "proprietary"),
            problem=blackwell_problem(settings, blackwell, module, driver["flavour"]),
        )
    else:
        require(
            name=title, ok=False, problem=_below_floor(settings, state.gpu, state.release, driver["devices"], module)
        )
        return
    kernel = newest_kernel_without_module(driver)
    if kernel is not None:
        planning.notice(
            docker.warn,
            name=f"Kernel {kernel} has no NVIDIA module",
            message=kernel_line(settings, state.release, kernel),
        )
    _plan_hold(settings, mine, ())


def _reboot_needed(
    settings: Settings, state: NvidiaHost, driver: DriverState, module: str | None, installed: str, title: str
) -> None:
    line = reboot_line(settings.host, module, installed)
    require(
        name=f"{title} (the installed {installed}, loaded after the reboot)",
        ok=driver_meets(installed, settings.nvidia_driver_min),
        problem=_below_floor(settings, state.gpu, state.release, driver["devices"], f"{installed} (installed)"),
    )
    if settings.nvidia_driver_install and driver["rebooted_for"] == installed:
        require(
            name=f"Check that the NVIDIA module {installed} loaded after labfleet's reboot",
            ok=False,
            problem=rebooted_problem(settings, module, installed),
        )
        return
    if settings.nvidia_driver_install:
        plan_reboot(settings, line)
        return
    planning.notice(
        docker.warn,
        name=f"Reboot needed: module {module or 'none'} loaded, driver {installed} installed",
        message=f"{line} (until then containers cannot use the GPU; the GPU check is skipped)",
    )


def _plan_hold(settings: Settings, mine: DriverHost, packages: Sequence[str]) -> None:
    release = held_release(settings, mine.driver)
    names = set(mine.driver["packages"]) | (set(packages) if settings.nvidia_driver_version else set())
    current = release is None or not names or mine.pin == pin_text(names, release).splitlines()
    planning.unless_current(
        hold_driver,
        current=current,
        name="Hold the NVIDIA driver packages against apt upgrade and unattended-upgrades",
        packages=tuple(sorted(packages)),
        version=settings.nvidia_driver_version,
    )


def _install_driver(settings: Settings, state: NvidiaHost, mine: DriverHost, title: str, secure_boot: bool | None):
    try:
        release = platform.distribution(state.release)
    except platform.UnsupportedDistribution as error:
        plan: platform.DriverPlan | str = (
            f"host {settings.host}: {error}; labfleet installs NVIDIA drivers on Debian and Ubuntu only"
        )
    else:
        plan = driver_install_plan(settings, release, state.arch, secure_boot, mine.driver["devices"])
    if isinstance(plan, str):
        require(
            name=title,
            ok=False,
            problem=f"{_below_floor(settings, state.gpu, state.release, mine.driver['devices'])}. {plan}",
        )
        return
    floor = settings.nvidia_driver_min
    if platform.blackwell_devices(mine.driver["devices"]):
        floor = max(floor, platform.BLACKWELL_MIN_DRIVER, key=release_key)
    held = mine.pin is not None and not settings.nvidia_driver_version
    candidate = settings.nvidia_driver_version or candidate_release(plan, mine.policy, held)
    if candidate is not None and not driver_meets(candidate, floor):
        require(name=title, ok=False, problem=candidate_problem(settings, release, candidate, floor))
        return
    codename = release.codename
    distribution_sources = zip(platform.DEBIAN_SOURCES, (state.debian_sources, state.sources_list), strict=True)
    for path, lines in distribution_sources:
        if plan.components and lines is not None:
            apt.enable_apt_components(
                name=f"Enable {' '.join(plan.components)} in {path}",
                path=path,
                suites=(codename, f"{codename}-updates", f"{codename}-security"),
                components=plan.components,
            )
    # The pin first: with nvidia_driver_version it is what makes apt install that release;
    # without, the hold of the release below the floor is lifted, and set again after.
    if settings.nvidia_driver_version:
        _plan_hold(settings, mine, plan.driver_packages)
    elif held:
        files.file(name="Lift the hold of the NVIDIA driver below the floor to install", path=PIN_FILE, present=False)
    if plan.ubuntu_drivers:
        apt.ensure_packages(name="Install ubuntu-drivers-common", packages=plan.packages)
        driver = install_ubuntu_driver(
            name=f"Install the NVIDIA driver {plan.ubuntu_drivers} with ubuntu-drivers",
            branch=plan.ubuntu_drivers,
            installed_when=plan.installed_when,
            version=settings.nvidia_driver_version,
        )
    else:
        driver = install_driver_packages(
            name=f"Install {', '.join(plan.packages)}",
            packages=plan.packages,
            version=settings.nvidia_driver_version,
        )
    # Read again once installed: the packages the install pulled in are held too.
    hold_driver(
        name="Hold the installed NVIDIA driver packages",
        packages=plan.driver_packages,
        version=settings.nvidia_driver_version,
    )
    reason = f"{settings.host}: labfleet installed {plan.installed_when}, which needs a reboot to load"
    reboot = plan_reboot(settings, reason, when=driver.did_change)
    check_loaded_driver(
        name=f"{title} (after the reboot)",
        floor=settings.nvidia_driver_min,
        problem=(
            f"labfleet installed {plan.installed_when} and rebooted, and the driver loaded now is still below "
            f"{settings.nvidia_driver_min}, the floor for CUDA {settings.cuda}: see dkms status and dmesg on "
            f"{settings.host} (with Secure Boot, the module's key must be enrolled)"
        ),
        _if=reboot.did_change,
    )
