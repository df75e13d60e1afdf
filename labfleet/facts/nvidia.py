"""Facts about NVIDIA GPUs, the driver, the CDI spec and the GPU inside a container (labfleet.nvidia)."""

from __future__ import annotations

import shlex
from typing import TypedDict

from pyinfra.api import FactBase

# PCI display classes: VGA (0x0300xx) and 3D controller (0x0302xx, the data-centre cards).
GPU_CLASSES = ("0x0300", "0x0302")


SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


class GpuHostState(TypedDict):
    gpus: list[str]
    driver: str | None
    nouveau: bool
    secure_boot: bool | None


class RuntimeState(TypedDict):
    spec: bool
    spec_driver: str | None
    hook_changed: int | None
    service_started: int | None


class GpuHost(FactBase[GpuHostState]):
    """Everything the NVIDIA step decides from, in one round trip.

    Returns ``{"gpus": [slot, ...], "driver": "570.86.15" | None, "nouveau": bool,
    "secure_boot": True | False | None}``. GPUs come from sysfs (vendor 10de, display or
    3D class) or the driver's /proc entries, so neither lspci nor nvidia-smi is needed.
    """

    @staticmethod
    def default() -> GpuHostState:
        return {"gpus": [], "driver": None, "nouveau": False, "secure_boot": None}

    def command(self) -> str:
        return (
            "for d in /sys/bus/pci/devices/*; do "
            '[ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] || continue; '
            'echo "pci ${d##*/} $(cat "$d/class" 2>/dev/null)"; done; '
            "ls /proc/driver/nvidia/gpus 2>/dev/null | sed 's/^/driver-gpu /'; "
            "sed -n 's/^NVRM version:/nvrm/p' /proc/driver/nvidia/version 2>/dev/null; "
            "grep -q '^nouveau ' /proc/modules 2>/dev/null && echo nouveau; "
            f"[ -r {SECURE_BOOT_VAR} ] && echo \"secureboot $(od -An -tu1 {SECURE_BOOT_VAR} | awk '{{print $NF}}')\"; "
            "true"
        )

    def process(self, output):
        return parse_gpu_host(output)


def parse_gpu_host(lines) -> GpuHostState:
    state = GpuHost.default()
    gpus: set[str] = set()
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        pci_gpu = parts[0] == "pci" and len(parts) >= 3 and parts[2].startswith(GPU_CLASSES)
        if pci_gpu or (parts[0] == "driver-gpu" and len(parts) == 2):
            gpus.add(parts[1])
        elif parts[0] == "nvrm":
            versions = [word for word in parts if word[:1].isdigit() and "." in word]
            state["driver"] = versions[0] if versions else None
        elif parts[0] == "nouveau":
            state["nouveau"] = True
        elif parts[0] == "secureboot" and len(parts) == 2:
            state["secure_boot"] = parts[1] == "1"
    state["gpus"] = sorted(gpus)
    return state


class NvidiaRuntimeState(FactBase[RuntimeState]):
    """What the NVIDIA runtime step decides from, in one round trip.

    + spec: the CDI spec labfleet generates
    + marker: the file that holds the driver version the spec was generated for
    + hook: the command whose presence makes dockerd register its ``nvidia`` GPU driver
    + service: dockerd's systemd unit

    Returns ``{"spec": bool, "spec_driver": str | None, "hook_changed": epoch | None,
    "service_started": epoch | None}``: ``hook_changed`` is the ctime of the hook (set
    when dpkg installs it), ``service_started`` when the unit last became active (None
    when it is not running).
    """

    @staticmethod
    def default() -> RuntimeState:
        return {"spec": False, "spec_driver": None, "hook_changed": None, "service_started": None}

    def command(self, spec: str, marker: str, hook: str, service: str) -> str:
        unit = shlex.quote(service)
        return (
            f"[ -f {shlex.quote(spec)} ] && echo spec; "
            f'echo "spec-driver $(cat {shlex.quote(marker)} 2>/dev/null)"; '
            f'h=$(command -v {shlex.quote(hook)}) && echo "hook-changed $(stat -c %Z "$h")"; '
            f'if [ "$(systemctl is-active {unit} 2>/dev/null)" = active ]; then '
            f"t=$(systemctl show -p ActiveEnterTimestamp --value {unit}); "
            '[ -n "$t" ] && echo "service-started $(date -d "$t" +%s)"; fi; true'
        )

    def process(self, output):
        return parse_nvidia_runtime_state(output)


def parse_nvidia_runtime_state(lines) -> RuntimeState:
    state = NvidiaRuntimeState.default()
    for line in lines:
        kind, _, value = line.strip().partition(" ")
        value = value.strip()
        if kind == "spec":
            state["spec"] = True
        elif kind == "spec-driver":
            state["spec_driver"] = value or None
        elif kind == "hook-changed" and value.isdigit():
            state["hook_changed"] = int(value)
        elif kind == "service-started" and value.isdigit():
            state["service_started"] = int(value)
    return state


class GpuInContainer(FactBase):
    """Runs ``nvidia-smi -L`` and the image's smoke test in one throwaway GPU container.

    + image: the lab image
    + gpus: the value of ``docker run --gpus``

    Returns ``{"rc": int, "output": [lines]}``; rc 0 means the GPU was visible and the
    smoke test passed. Costly (a container start, torch import, a matmul), so it runs
    only when the deploy executes, on GPU hosts.
    """

    def command(self, image: str, gpus: str) -> str:
        check = "nvidia-smi -L && python3 /opt/labfleet/smoke_test.py"
        return (
            f"docker run --rm --gpus {shlex.quote(gpus)} {shlex.quote(image)} sh -c {shlex.quote(check)} 2>&1; "
            'echo "labfleet-rc=$?"'
        )

    def process(self, output):
        return parse_gpu_in_container(output)


def parse_gpu_in_container(lines) -> dict:
    """``{"rc": int, "output": [lines]}`` from GpuInContainer's output (the last ``labfleet-rc=N`` line)."""
    rc, output = 1, []
    for line in lines:
        if line.startswith("labfleet-rc="):
            rc = int(line.partition("=")[2] or 1)
        else:
            output.append(line)
    return {"rc": rc, "output": output}
