"""The NVIDIA layer: GPU detection and the host driver floor.

A GPU host whose driver is missing or older than `nvidia_driver_min` stops here, alone,
with what to install: an image whose CUDA is newer than the driver fails only later,
inside the container, with "CUDA driver version is insufficient".
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.facts.server import LinuxDistribution

from labfleet.facts import GpuHost
from labfleet.preflight import require
from labfleet.settings import Settings


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def driver_meets(driver: str | None, floor: str) -> bool:
    """True when driver >= floor; "570" means any 570.x."""
    return driver is not None and version_tuple(driver) >= version_tuple(floor)


def has_gpu(settings: Settings) -> bool:
    """`gpu: true/false` decides; `auto` asks the PCI bus and the driver."""
    if isinstance(settings.gpu, bool):
        return settings.gpu
    return bool(host.get_fact(GpuHost)["gpus"])


def driver_advice(settings: Settings, distro: dict, gpu: dict) -> str:
    """What to install, in the words of this host's distribution."""
    branch = settings.nvidia_driver_min.split(".")[0]
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
    return f"install {install}, then reboot.{extra}"


@deploy("Check the NVIDIA driver")
def check_driver(settings: Settings):
    if not has_gpu(settings):
        host.noop("no NVIDIA GPU on this host (gpu: auto found none, or gpu: false): the NVIDIA step is skipped")
        return
    gpu = host.get_fact(GpuHost)
    floor = settings.nvidia_driver_min
    found = gpu["driver"] or "none loaded"
    require(
        name=f"Check that the NVIDIA driver is at least {floor}",
        ok=driver_meets(gpu["driver"], floor),
        problem=(
            f"host {settings.host}: NVIDIA driver {found} is below {floor}, the floor for CUDA {settings.cuda} "
            f"(nvidia_driver_min); {driver_advice(settings, host.get_fact(LinuxDistribution) or {}, gpu)}"
        ),
    )
