"""Facts labfleet reads from hosts, each with its own small parser."""

from __future__ import annotations

from pyinfra.api import FactBase

NVIDIA_VENDOR = "0x10de"
# PCI display classes: VGA (0x0300xx) and 3D controller (0x0302xx, the data-centre cards).
GPU_CLASSES = ("0x0300", "0x0302")


class NvidiaGpus(FactBase):
    """NVIDIA GPUs seen on the PCI bus (sysfs, so lspci need not be installed) or by the driver.

    Returns a list of ``{"slot": "0000:01:00.0", "source": "pci" | "driver"}``.
    """

    def command(self) -> str:
        return (
            "for d in /sys/bus/pci/devices/*; do "
            '[ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] || continue; '
            'echo "pci ${d##*/} $(cat "$d/class" 2>/dev/null)"; '
            "done; "
            "ls /proc/driver/nvidia/gpus 2>/dev/null | sed 's/^/driver /'; true"
        )

    def process(self, output):
        gpus: dict[str, dict] = {}
        for line in output:
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "pci" and parts[2].startswith(GPU_CLASSES):
                gpus.setdefault(parts[1], {"slot": parts[1], "source": "pci"})
            elif len(parts) == 2 and parts[0] == "driver":
                gpus.setdefault(parts[1], {"slot": parts[1], "source": "driver"})
        return sorted(gpus.values(), key=lambda gpu: gpu["slot"])
