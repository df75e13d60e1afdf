"""What differs between the distributions labfleet supports, in one place.

geerlingguy's Docker role keeps each distribution's differences in ``vars/<Distro>.yml``
and one task list per family; labfleet keeps them here, as tables that the steps look
up, so that no step asks ``if distro == ...`` itself. Supporting a new release or a
derivative means reading this file: how the host's release is named (``distribution``),
which packages give it Docker (``docker_packages``, ``DOCKER_CONFLICTS``), which give it
the NVIDIA driver (``nvidia_driver``), and which tools the datasets step needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class DriverPlan:
    """How a release gets an NVIDIA driver branch (``nvidia_driver_install: true``).

    ``packages`` are installed with apt; ``ubuntu_drivers`` is the ``ubuntu-drivers
    install`` argument; ``installed_when`` is the package whose presence means it is done;
    ``components`` are enabled in the distribution's own sources first; ``signed_modules``
    says whether the modules come signed for Secure Boot (Debian's are DKMS-built and must
    be signed with a key enrolled at the console).
    """

    packages: tuple[str, ...] = ()
    ubuntu_drivers: str | None = None
    installed_when: str = ""
    components: tuple[str, ...] = ()
    signed_modules: bool = True


def nvidia_driver(distro_id: str, branch: str, arch: str) -> DriverPlan:
    """The driver of branch (``"570"``) for a release of distro_id, on dpkg architecture arch.

    Ubuntu: ``ubuntu-drivers install nvidia:<branch>-server``, which picks Canonical's signed
    modules for the running kernel. Debian: ``nvidia-driver`` from non-free (the branch the
    release carries), with the headers DKMS builds against.
    """
    if distro_id == "ubuntu":
        return DriverPlan(
            packages=("ubuntu-drivers-common",),
            ubuntu_drivers=f"nvidia:{branch}-server",
            installed_when=f"nvidia-driver-{branch}-server",
        )
    return DriverPlan(
        packages=(f"linux-headers-{arch}", "nvidia-driver", "firmware-misc-nonfree"),
        installed_when="nvidia-driver",
        components=DEBIAN_DRIVER_COMPONENTS,
        signed_modules=False,
    )


def driver_install_hint(release_name: str, branch: str) -> str:
    """What a person installs to get the driver branch, in the words of the host's distribution."""
    name = release_name.lower()
    if "ubuntu" in name:
        return f"`sudo apt install nvidia-driver-{branch}-server` (or `sudo ubuntu-drivers install`)"
    if "debian" in name:
        return "`nvidia-driver` from Debian's non-free component (or NVIDIA's CUDA repository)"
    return f"NVIDIA driver {branch} or newer"


# --- Datasets ------------------------------------------------------------------------------------

# rrsync, the forced command that keeps a peer's pulls read-only and inside one path, is
# installed as a command by the rsync package from rsync 3.2.4 on.
RRSYNC = {"command": "rrsync", "path": "/usr/bin/rrsync", "package": "rsync", "since": "3.2.4"}
