"""The NVIDIA driver on GPU hosts: the floor, and installing the distribution's driver.

On a GPU host (``gpu``, or detection: PCI vendor 10de or /proc/driver/nvidia), a driver
that is missing or older than ``nvidia_driver_min`` stops that host, alone, with what to
install. An image whose CUDA is newer than the driver would fail only later, inside the
container, with "CUDA driver version is insufficient". With ``nvidia_driver_install:
true`` the deploy installs the distribution's driver branch instead (Ubuntu:
``ubuntu-drivers install nvidia:<branch>-server``, which picks Canonical's signed modules
for the running kernel; Debian: ``nvidia-driver`` from non-free, enabled in the
distribution's own sources entry when missing), reboots with ``server.reboot`` only when
packages changed, and checks the loaded driver again after the reboot.

It runs first among the NVIDIA steps (deploy.py), before the toolkit (labfleet.nvidia).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, operation
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.operations import server

from labfleet import apt, planning, platform
from labfleet.facts.nvidia import GpuHost
from labfleet.nvidia import NvidiaHost, explain_skip, has_gpu, snapshot, wants_toolkit
from labfleet.planning import step
from labfleet.preflight import require
from labfleet.settings import Settings


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def driver_meets(driver: str | None, floor: str) -> bool:
    """True when driver >= floor; "570" means any 570.x."""
    return driver is not None and version_tuple(driver) >= version_tuple(floor)


def driver_branch(settings: Settings) -> str:
    return settings.nvidia_driver_min.split(".")[0]


def driver_advice(settings: Settings, release: Mapping, gpu: Mapping) -> str:
    """What to install, in the words of this host's distribution."""
    install = platform.driver_install_hint(release.get("name") or "", driver_branch(settings))
    notes = []
    if gpu["nouveau"]:
        notes.append("nouveau is loaded and must be blacklisted")
    if gpu["secure_boot"]:
        notes.append("Secure Boot is on, so the module must be signed (enrol the MOK key when asked)")
    extra = f" Note: {'; '.join(notes)}." if notes else ""
    return f"install {install}, then reboot.{extra} Or set nvidia_driver_install: true to let labfleet install it"


def _below_floor(settings: Settings, gpu: Mapping, release: Mapping) -> str:
    found = gpu["driver"] or "none loaded"
    return (
        f"host {settings.host}: NVIDIA driver {found} is below {settings.nvidia_driver_min}, the floor for "
        f"CUDA {settings.cuda} (nvidia_driver_min); {driver_advice(settings, release, gpu)}"
    )


def driver_install_plan(
    settings: Settings, distro: str, arch: str, secure_boot: bool | None
) -> platform.DriverPlan | str:
    """The plan for this host (platform.nvidia_driver), or why labfleet will not install the driver here."""
    plan = platform.nvidia_driver(distro, driver_branch(settings), arch)
    if secure_boot and not plan.signed_modules:
        return (
            f"host {settings.host}: Secure Boot is on, and Debian's nvidia-driver is a DKMS module that must be "
            "signed with a key enrolled at the console (mokutil --import /var/lib/dkms/mok.pub, then reboot and "
            "enrol it); labfleet does not automate that: install the driver by hand, or turn Secure Boot off"
        )
    return plan


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


@step("Check the NVIDIA driver")
def check_driver(settings: Settings):
    """The driver floor on GPU hosts; with nvidia_driver_install, the driver itself."""
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
    state = snapshot(settings)
    title = f"Check that the NVIDIA driver is at least {settings.nvidia_driver_min}"
    if driver_meets(state.gpu["driver"], settings.nvidia_driver_min):
        require(name=title, ok=True, problem="")
    elif settings.nvidia_driver_install:
        _install_driver(settings, state, title)
    else:
        require(name=title, ok=False, problem=_below_floor(settings, state.gpu, state.release))


def _install_driver(settings: Settings, state: NvidiaHost, title: str):
    try:
        release = platform.distribution(state.release)
    except platform.UnsupportedDistribution as error:
        plan: platform.DriverPlan | str = (
            f"host {settings.host}: {error}; labfleet installs NVIDIA drivers on Debian and Ubuntu only"
        )
    else:
        plan = driver_install_plan(settings, release.id, state.arch, state.gpu["secure_boot"])
    if isinstance(plan, str):
        require(name=title, ok=False, problem=f"{_below_floor(settings, state.gpu, state.release)}. {plan}")
        return
    codename = release.codename
    distribution_sources = zip(platform.DEBIAN_SOURCES, (state.debian_sources, state.sources_list), strict=True)
    changed_sources = [
        enable_apt_components(
            name=f"Enable {' '.join(plan.components)} in {path}",
            path=path,
            suites=(codename, f"{codename}-updates", f"{codename}-security"),
            components=plan.components,
        )
        for path, lines in distribution_sources
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
