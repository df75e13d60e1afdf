"""What differs between the distributions labfleet supports, in one place.

geerlingguy's Docker role keeps each distribution's differences in ``vars/<Distro>.yml``
and one task list per family; labfleet keeps them here, as tables that the steps look
up, so that no step asks ``if distro == ...`` itself. Supporting a new release or a
derivative means reading this file: how the host's release is named (``distribution``),
which packages give it Docker (``docker_packages``, ``DOCKER_CONFLICTS``), which give it
the NVIDIA driver (``nvidia_driver``), and which tools the datasets step needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date

# --- The host's release ---------------------------------------------------------------------

FAMILIES = ("debian", "ubuntu")


class UnsupportedDistribution(ValueError):
    """The host is not a Debian or Ubuntu release labfleet knows how to set up."""


@dataclass(frozen=True)
class Distribution:
    """A host's release as the tables below key it: ``Distribution("debian", "trixie", 13)``.

    ``id`` is ``debian`` or ``ubuntu``: an Ubuntu derivative (ID_LIKE ubuntu) is set up as
    the Ubuntu release it is built on, as Docker's own install guide does.
    """

    id: str
    codename: str
    major: int | None


def distribution(release: Mapping) -> Distribution:
    """The host's Distribution, from pyinfra's LinuxDistribution fact.

    Raises UnsupportedDistribution, with a sentence that says why, for anything else.
    """
    meta = release.get("release_meta") or {}
    distro_id = (meta.get("ID") or "").lower()
    like = (meta.get("ID_LIKE") or "").lower().split()
    if distro_id in FAMILIES:
        codename = meta.get("VERSION_CODENAME") or meta.get("UBUNTU_CODENAME") or ""
    elif "ubuntu" in like:
        distro_id, codename = "ubuntu", meta.get("UBUNTU_CODENAME") or ""
    else:
        name = release.get("name") or distro_id or "this distribution"
        raise UnsupportedDistribution(f"{name} is not Debian or Ubuntu")
    if not codename:
        raise UnsupportedDistribution(f"/etc/os-release of this {distro_id} host names no VERSION_CODENAME")
    return Distribution(distro_id, codename, release.get("major"))


# --- Docker ------------------------------------------------------------------------------------

# Docker's repository has the same package names for every release it serves.
DOCKER_CE_PACKAGES = ("docker-ce", "docker-ce-cli", "containerd.io", "docker-buildx-plugin", "docker-compose-plugin")
# The distribution's own engine, with its CLI, Compose v2 and buildx. Debian 13's docker.io
# only recommends docker-cli, which holds the docker command.
DOCKER_DISTRO_PACKAGES = {
    "ubuntu": ("docker.io", "docker-compose-v2", "docker-buildx"),
    "debian": ("docker.io", "docker-cli", "docker-compose", "docker-buildx"),
}
# Debian before 13 ships only Compose v1 (docker-compose 1.29, no `docker compose`).
DEBIAN_FIRST_WITH_COMPOSE_V2 = 13
# The packages each source replaces; apt refuses to install one set over the other.
DOCKER_CONFLICTS = {
    "docker-ce": (
        "docker.io",
        "docker-doc",
        "docker-cli",
        "docker-compose",
        "docker-compose-v2",
        "docker-buildx",
        "podman-docker",
        "containerd",
        "runc",
    ),
    "distro": (*DOCKER_CE_PACKAGES, "docker-ce-rootless-extras", "podman-docker"),
}
# The packages docker_version pins: those that carry the engine's own version string.
DOCKER_PINNED = {"docker-ce": ("docker-ce", "docker-ce-cli"), "distro": ("docker.io", "docker-cli")}


def docker_packages(source: str, release: Distribution) -> tuple[str, ...] | None:
    """The packages that give this release Docker from source; None when that has no Compose v2 here."""
    if source == "docker-ce":
        return DOCKER_CE_PACKAGES
    if release.id == "debian" and release.major is not None and release.major < DEBIAN_FIRST_WITH_COMPOSE_V2:
        return None
    return DOCKER_DISTRO_PACKAGES[release.id]


# --- The NVIDIA driver -------------------------------------------------------------------------

# The files the Debian installer writes; non-free is enabled only there, never in a
# third party's file whose repository may not have that component.
DEBIAN_SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
DEBIAN_DRIVER_COMPONENTS = ("contrib", "non-free", "non-free-firmware")
# The headers DKMS builds the module against: Debian's default kernel flavour per dpkg
# architecture (the architectures Debian builds nvidia-driver for).
DEBIAN_KERNEL_HEADERS = {"amd64": "linux-headers-amd64", "arm64": "linux-headers-arm64"}
# The driver each Debian release carries in non-free (apt-cache policy nvidia-driver,
# 2026-12): what "install nvidia-driver" gets, known before non-free is enabled.
DEBIAN_RELEASE_DRIVER = {"bookworm": "535.261.03", "trixie": "550.163.01"}
# NVIDIA's driver branches and the last day NVIDIA supports each (NVIDIA's driver lifecycle:
# R535 to 2026-06, R570 to 2026-02, R580 to 2028-08). Ubuntu's archive carries the
# ``-server`` builds of each; one past its end gets no more security fixes.
DRIVER_BRANCHES = {"535": date(2026, 6, 30), "570": date(2026, 2, 28), "580": date(2028, 8, 31)}
# PCI device ids by generation, as NVIDIA's open kernel modules' README lists them: Turing
# starts at 0x1E02 (TITAN RTX; every earlier id is Volta or older), Blackwell at 0x2900 (B100/
# B200; the GeForce RTX 5090 is 0x2B85). Known before any driver is loaded, from sysfs.
FIRST_TURING_DEVICE = 0x1E00
FIRST_BLACKWELL_DEVICE = 0x2900
# The first branch that drives Blackwell, with the open kernel modules only.
BLACKWELL_MIN_DRIVER = "570"


def open_kernel_modules(devices: Sequence[int]) -> bool:
    """Whether this host gets NVIDIA's open kernel modules: every GPU Turing or newer.

    NVIDIA's default since R560, the only flavour Blackwell runs; a host with a pre-Turing
    GPU (no GSP) keeps the proprietary flavour, as NVIDIA advises for mixed hosts. No device
    id read (no sysfs): open, the default.
    """
    return all(device >= FIRST_TURING_DEVICE for device in devices)


def blackwell_devices(devices: Sequence[int]) -> list[int]:
    return [device for device in devices if device >= FIRST_BLACKWELL_DEVICE]


def supported_branch(floor: str, today: date) -> str | None:
    """The NVIDIA branch to install on Ubuntu: still supported on today, at or above floor's
    branch, and of those the one supported longest; None when none is."""
    floor_branch = int(floor.split(".")[0])
    supported = [b for b, end in DRIVER_BRANCHES.items() if end >= today and int(b) >= floor_branch]
    return max(supported, key=lambda b: DRIVER_BRANCHES[b]) if supported else None


@dataclass(frozen=True)
class DriverPlan:
    """How a release gets an NVIDIA driver branch (``nvidia_driver_install: true``).

    ``packages`` are installed with apt; ``ubuntu_drivers`` is the ``ubuntu-drivers
    install`` argument; ``installed_when`` is the package whose presence means it is done
    (and whose ``apt-cache policy`` candidate is compared with the floor before anything
    is installed); ``components`` are enabled in the distribution's own sources first;
    ``signed_modules`` says whether the modules come signed for Secure Boot (Debian's are
    DKMS-built and must be signed with a key enrolled at the console); ``release_driver``
    is the driver the release is known to carry, for when apt cannot tell yet;
    ``driver_packages`` are those built from the driver's own sources, which the hold pins.
    """

    packages: tuple[str, ...] = ()
    ubuntu_drivers: str | None = None
    installed_when: str = ""
    components: tuple[str, ...] = ()
    signed_modules: bool = True
    release_driver: str | None = None
    driver_packages: tuple[str, ...] = ()


def nvidia_driver(release: Distribution, arch: str, branch: str, open_modules: bool) -> DriverPlan | str:
    """The driver for release on dpkg architecture arch, or why there is none.

    + branch: the NVIDIA branch (Ubuntu installs it; Debian has one per release)
    + open_modules: NVIDIA's open kernel modules, or the proprietary flavour

    Ubuntu: ``ubuntu-drivers install nvidia:<branch>-server[-open]``, which picks Canonical's
    signed modules for the running kernel. Debian: ``nvidia-driver`` from non-free, with
    ``libcuda1`` and ``nvidia-smi``, which it only recommends (so ``--no-install-recommends``
    left torch without CUDA and the GPU check without nvidia-smi), the DKMS module of the
    flavour, and the headers DKMS builds against.
    """
    if release.id == "ubuntu":
        flavour = f"{branch}-server" + ("-open" if open_modules else "")
        return DriverPlan(
            packages=("ubuntu-drivers-common",),
            ubuntu_drivers=f"nvidia:{flavour}",
            installed_when=f"nvidia-driver-{flavour}",
            driver_packages=(f"nvidia-driver-{flavour}",),
        )
    headers = DEBIAN_KERNEL_HEADERS.get(arch)
    if headers is None:
        return f"Debian builds nvidia-driver for {', '.join(DEBIAN_KERNEL_HEADERS)} only, not {arch}"
    module = "nvidia-open-kernel-dkms" if open_modules else "nvidia-kernel-dkms"
    driver = ("nvidia-driver", module, "libcuda1", "nvidia-smi")
    return DriverPlan(
        packages=(*driver, "firmware-misc-nonfree", headers),
        driver_packages=driver,
        installed_when="nvidia-driver",
        components=DEBIAN_DRIVER_COMPONENTS,
        signed_modules=False,
        release_driver=DEBIAN_RELEASE_DRIVER.get(release.codename),
    )


def driver_install_hint(release_name: str, branch: str, open_modules: bool = True) -> str:
    """What a person installs to get the driver branch, in the words of the host's distribution.

    + open_modules: NVIDIA's open kernel modules (``open_kernel_modules``); a pre-Turing GPU
      needs the proprietary flavour, which Ubuntu names without ``-open``
    """
    name = release_name.lower()
    if "ubuntu" in name:
        package = f"nvidia-driver-{branch}-server" + ("-open" if open_modules else "")
        return f"`sudo apt install {package}` (or `sudo ubuntu-drivers install`)"
    if "debian" in name:
        return "`nvidia-driver` from Debian's non-free component (or NVIDIA's CUDA repository)"
    return f"NVIDIA driver {branch} or newer"


# --- Datasets ------------------------------------------------------------------------------------

# rrsync, the forced command that keeps a peer's pulls read-only and inside one path, is
# installed as a command by the rsync package from rsync 3.2.4 on.
RRSYNC = {"command": "rrsync", "path": "/usr/bin/rrsync", "package": "rsync", "since": "3.2.4"}
