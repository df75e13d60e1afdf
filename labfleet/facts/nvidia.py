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
    spec_for: str | None
    refresh_spec: bool
    default_runtime: bool
    hook_changed: int | None
    service_started: int | None


class GpuArchitecture(TypedDict):
    index: int
    name: str
    compute_cap: tuple[int, int]


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

    + spec: the CDI spec labfleet generates (toolkits before 1.18)
    + marker: the file that says what the current CDI spec was made for
    + refresh_spec: the CDI spec that NVIDIA's nvidia-cdi-refresh.service writes (1.18 and later)
    + default_runtime: the file that says labfleet made nvidia dockerd's default runtime
    + hook: the command whose presence makes dockerd register its ``nvidia`` GPU driver
    + service: dockerd's systemd unit

    Returns ``{"spec": bool, "spec_for": str | None, "refresh_spec": bool, "default_runtime":
    bool, "hook_changed": epoch | None, "service_started": epoch | None}``: ``spec_for`` is
    the marker's text, ``hook_changed`` the ctime of the hook (set when dpkg installs it),
    ``service_started`` when the unit last became active (None when it is not running).
    """

    @staticmethod
    def default() -> RuntimeState:
        return {
            "spec": False,
            "spec_for": None,
            "refresh_spec": False,
            "default_runtime": False,
            "hook_changed": None,
            "service_started": None,
        }

    def command(self, spec: str, marker: str, refresh_spec: str, default_runtime: str, hook: str, service: str) -> str:
        unit = shlex.quote(service)
        return (
            f"[ -f {shlex.quote(spec)} ] && echo spec; "
            f'echo "spec-for $(cat {shlex.quote(marker)} 2>/dev/null)"; '
            f"[ -f {shlex.quote(refresh_spec)} ] && echo refresh-spec; "
            f"[ -f {shlex.quote(default_runtime)} ] && echo default-runtime; "
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
        elif kind == "spec-for":
            state["spec_for"] = value or None
        elif kind == "refresh-spec":
            state["refresh_spec"] = True
        elif kind == "default-runtime":
            state["default_runtime"] = True
        elif kind == "hook-changed" and value.isdigit():
            state["hook_changed"] = int(value)
        elif kind == "service-started" and value.isdigit():
            state["service_started"] = int(value)
    return state


class GpuArchitectures(FactBase[list[GpuArchitecture]]):
    """Each GPU's index, name and CUDA compute capability, from the loaded driver's nvidia-smi.

    Returns ``[{"index": 0, "name": "Tesla V100-SXM2-16GB", "compute_cap": (7, 0)}, ...]``;
    an empty list where no driver is loaded or nvidia-smi is missing or fails (drivers
    before 510 lack the ``compute_cap`` field): then nothing is known, and nothing refused.
    """

    @staticmethod
    def default() -> list[GpuArchitecture]:
        return []

    def command(self) -> str:
        return (
            "[ -e /proc/driver/nvidia/version ] && command -v nvidia-smi >/dev/null && "
            "nvidia-smi --query-gpu=index,name,compute_cap --format=csv,noheader 2>/dev/null; true"
        )

    def process(self, output):
        return parse_gpu_architectures(output)


def parse_gpu_architectures(lines) -> list[GpuArchitecture]:
    """``nvidia-smi --query-gpu=index,name,compute_cap --format=csv,noheader`` lines; others are skipped.

    A name may hold commas, so the index is the first field and the capability the last.
    """
    gpus: list[GpuArchitecture] = []
    for line in lines:
        index, _, rest = line.strip().partition(",")
        name, _, cap = rest.rpartition(",")
        major, dot, minor = cap.strip().partition(".")
        if index.strip().isdigit() and dot and major.isdigit() and minor.isdigit() and name.strip():
            gpus.append({"index": int(index), "name": name.strip(), "compute_cap": (int(major), int(minor))})
    return gpus


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
