"""The NVIDIA layer: GPU detection, the Container Toolkit, and the GPU check in the lab image.

The NVIDIA steps of deploy.py, in its order (Docker must find the toolkit when it starts):

1. ``nvidia_driver.check_driver``: Secure Boot, a reboot due, the driver floor, and the
   driver itself with ``nvidia_driver_install`` (labfleet/nvidia_driver.py).
2. ``install_container_toolkit`` (here): NVIDIA's apt repository as a deb822 file whose
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
3. ``nvidia_runtime.daemon_keys`` into the docker step's one daemon.json write, and
   ``nvidia_runtime.configure_container_runtime`` after it: dockerd restarted for a new
   hook, the CDI spec current, the default runtime (labfleet/nvidia_runtime.py).
4. ``gpu_architecture.check_gpu_architecture``, before the image and JupyterLab: every
   GPU's compute capability against the image's torch (labfleet/gpu_architecture.py).
5. ``verify_gpu`` (here), at the end of the deploy, runs ``nvidia-smi -L`` and the image's
   smoke test in one ``docker run --rm --gpus`` container on every GPU host, and fails
   that host with the output when the GPU is not visible. It runs on every deploy (a
   container start and a torch import, a few seconds per GPU host): cheap next to the cost
   of a lab that believes it has GPUs and trains on the CPU. It changes nothing, so it
   reports no change; while the host must reboot into its installed driver it is skipped.

``nvidia_toolkit: "auto"`` installs the toolkit where there is a GPU; ``true`` installs
it on hosts that have none yet, so a lab can prepare machines before the cards arrive.
Hosts without a GPU and without ``nvidia_toolkit: true`` skip the NVIDIA steps, and
the output says so.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

from pyinfra import host, logger
from pyinfra.api import operation
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import LinuxDistribution

from labfleet import apt, planning, platform
from labfleet.facts.apt import AptFiles
from labfleet.facts.nvidia import GpuHost, GpuHostState, GpuInContainer
from labfleet.facts.nvidia_driver import NvidiaDriver, reboot_needed
from labfleet.image import image_tag
from labfleet.model import TOOLKIT_FLOOR, TOOLKIT_FLOOR_REASON, release_below
from labfleet.planning import Read, step
from labfleet.preflight import require
from labfleet.settings import Settings

TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)


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
    debian_sources: list[str] | None = None
    sources_list: list[str] | None = None


GPU_READ = Read(GpuHost)


def reads_nothing(settings: Settings) -> bool:
    """``gpu: false`` without ``nvidia_toolkit: true``: no NVIDIA step does anything, so none reads."""
    return settings.gpu is False and settings.nvidia_toolkit is not True


def reads(settings: Settings) -> dict[str, Read]:
    """The facts the toolkit and driver steps decide from, by NvidiaHost field; none where they do nothing.

    All of them, GPU or not, so that deploy.py's one batch answers every NVIDIA step on a
    GPU host as on a CPU-only one.
    """
    if reads_nothing(settings):
        return {}
    found = {
        "gpu": GPU_READ,
        "release": Read(LinuxDistribution),
        "arch": Read(DebArch),
        "packages": Read(DebPackages),
        "apt_files": apt.repository_read(repository(settings)),
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
    if result["rc"] != 0 and any("could not select device driver" in line for line in output):
        # dockerd registers its nvidia GPU driver only when it starts with NVIDIA's hook on its
        # PATH; labfleet restarts it only for a hook its own run installed.
        return (
            "the GPU is not usable in the lab image: dockerd started before NVIDIA's hook was installed, so it "
            "has no nvidia GPU driver; restart it (sudo systemctl restart docker), then run the deploy again"
        )
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
