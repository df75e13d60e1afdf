"""Facts about the NVIDIA driver itself (labfleet.nvidia_driver): the loaded kernel module, the
installed user-space driver, Secure Boot as mokutil reports it, and what apt would install.

Each output has its own pure parser, unit-tested against outputs recorded on real machines
(tests/unit/test_nvidia_driver.py says where each came from).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence
from typing import TypedDict

from pyinfra.api import FactBase

from labfleet.model import release_key

PROC_VERSION = "/proc/driver/nvidia/version"
SYS_VERSION = "/sys/module/nvidia/version"
# Where the NVML library lands: Ubuntu's and NVIDIA's packages and the .run installer put
# libnvidia-ml.so.<version> in the multiarch directory, Debian's libnvidia-ml1 under
# nvidia/current/ (linked in through update-alternatives). NVML compares exactly this
# version with the loaded module's: a difference is "Driver/library version mismatch".
NVML_GLOBS = (
    "/usr/lib/*-linux-gnu/libnvidia-ml.so.*.*",
    "/usr/lib/*-linux-gnu/nvidia/current/libnvidia-ml.so.*.*",
    "/usr/lib64/libnvidia-ml.so.*.*",
)
_VERSION = re.compile(r"\b(\d{2,4}\.\d{1,3}(?:\.\d{1,3})?)\b")
# The installed release labfleet last rebooted a host for, written in the reboot's own command
# (labfleet.nvidia_driver.reboot_when_idle): a module that still differs from that release after
# the reboot will not load by rebooting again, so the next deploy stops instead.
REBOOT_MARKER = "/var/lib/labfleet/nvidia/rebooted-for"


class ModuleVersion(TypedDict):
    version: str | None
    flavour: str | None  # "open" (NVIDIA's open kernel modules), "proprietary", or None


def parse_proc_version(lines: Iterable[str]) -> ModuleVersion:
    """The module's version and flavour from /proc/driver/nvidia/version's NVRM line.

    The proprietary module says ``NVIDIA UNIX x86_64 Kernel Module  570.86.15  <date>``, the
    open one ``NVIDIA UNIX Open Kernel Module for x86_64  565.57.01  Release Build ...``:
    the version is the first dotted number after "Module", wherever the words put it.
    """
    for line in lines:
        if not line.startswith("NVRM version:"):
            continue
        _, _, after = line.partition("Module")
        found = _VERSION.search(after)
        flavour = "open" if "Open Kernel" in line else "proprietary"
        return {"version": found.group(1) if found else None, "flavour": flavour}
    return {"version": None, "flavour": None}


def parse_sys_version(text: str) -> str | None:
    """/sys/module/nvidia/version holds the version alone (``570.86.15``)."""
    found = _VERSION.fullmatch(text.strip())
    return found.group(1) if found else None


def parse_mokutil_sb_state(lines: Iterable[str]) -> bool | None:
    """``mokutil --sb-state``: True for "SecureBoot enabled", False for "SecureBoot disabled",
    None when the firmware has no Secure Boot to ask (legacy BIOS: "EFI variables are not
    supported on this system") or mokutil is absent."""
    for line in lines:
        text = line.strip().lower()
        if text.startswith("secureboot enabled"):
            return True
        if text.startswith("secureboot disabled"):
            return False
    return None


def upstream_version(debian_version: str) -> str:
    """``580.95.05-0ubuntu0.24.04.2`` -> ``580.95.05``: the driver release inside a package version."""
    without_epoch = debian_version.split(":", 1)[-1]
    return without_epoch.rsplit("-", 1)[0] if "-" in without_epoch else without_epoch


class DriverState(TypedDict):
    devices: list[int]  # PCI device ids of the NVIDIA display and 3D controllers
    module: str | None  # the loaded kernel module's version
    flavour: str | None  # "open" or "proprietary" while a module is loaded
    libraries: list[str]  # versions of the NVML library on disk (one, unless a removal failed)
    packages: dict[str, str]  # installed binary packages of the driver's sources: name -> version
    secure_boot: bool | None  # mokutil --sb-state; None without mokutil or without EFI
    kernels: dict[str, bool]  # each installed kernel (a /boot/vmlinuz-<release>) -> has an NVIDIA module
    rebooted_for: str | None  # the installed release labfleet last rebooted for (REBOOT_MARKER)


class NvidiaDriver(FactBase[DriverState]):
    """The driver as the kernel and the package manager see it, in one command.

    Returns ``{"devices": [0x2684, ...], "module": "570.86.15" | None, "flavour": "open" |
    "proprietary" | None, "libraries": ["570.86.15"], "packages": {"libcuda1": "570.86.15-1",
    ...}, "secure_boot": True | False | None, "kernels": {"6.8.0-51-generic": False, ...},
    "rebooted_for": "570.86.15" | None}``. The module comes from
    /proc/driver/nvidia/version (which also says its flavour), else /sys/module/nvidia/version.
    """

    @staticmethod
    def default() -> DriverState:
        return {
            "devices": [],
            "module": None,
            "flavour": None,
            "libraries": [],
            "packages": {},
            "secure_boot": None,
            "kernels": {},
            "rebooted_for": None,
        }

    def command(self) -> str:
        globs = " ".join(NVML_GLOBS)
        return (
            "for d in /sys/bus/pci/devices/*; do "
            '[ "$(cat "$d/vendor" 2>/dev/null)" = 0x10de ] || continue; '
            'case "$(cat "$d/class" 2>/dev/null)" in 0x0300*|0x0302*) echo "device $(cat "$d/device")";; esac; done; '
            f"sed -n '1s/^/proc /p' {PROC_VERSION} 2>/dev/null; "
            f'[ -r {SYS_VERSION} ] && echo "sys $(cat {SYS_VERSION})"; '
            f'for f in {globs}; do [ -f "$f" ] && echo "nvml ${{f##*/libnvidia-ml.so.}}"; done; '
            "dpkg-query -W -f '${db:Status-Abbrev} ${source:Package} ${Package} ${Version}\\n' 2>/dev/null "
            '| awk \'$1 == "ii" && $2 ~ /^nvidia-(graphics-drivers|open-gpu-kernel-modules)/ '
            '{ print "package", $3, $4 }\'; '
            "command -v mokutil >/dev/null && mokutil --sb-state 2>&1 | sed 's/^/mokutil /'; "
            # Each installed kernel, and whether it has an NVIDIA module to boot with: Ubuntu's
            # signed nvidia.ko, a DKMS build (Debian names it nvidia-current.ko), the .run's.
            "for d in /lib/modules/*/; do k=${d%/}; k=${k##*/}; [ -e /boot/vmlinuz-$k ] || continue; "
            "if find \"$d\" \\( -name 'nvidia.ko*' -o -name 'nvidia-current.ko*' \\) -print 2>/dev/null | grep -q .; "
            'then echo "kernel $k module"; else echo "kernel $k none"; fi; done; '
            f"sed -n '1s/^/rebooted-for /p' {REBOOT_MARKER} 2>/dev/null; true"
        )

    def process(self, output):
        return parse_driver_state(output)


def parse_driver_state(lines: Iterable[str]) -> DriverState:
    state = NvidiaDriver.default()
    proc: list[str] = []
    sys_version = None
    mokutil: list[str] = []
    for line in lines:
        kind, _, rest = line.strip().partition(" ")
        if kind == "device":
            try:
                state["devices"].append(int(rest.strip(), 16))
            except ValueError:
                continue
        elif kind == "proc":
            proc.append(rest)
        elif kind == "sys":
            sys_version = parse_sys_version(rest)
        elif kind == "nvml" and _VERSION.fullmatch(rest.strip()):
            state["libraries"].append(rest.strip())
        elif kind == "package" and len(rest.split()) == 2:
            name, version = rest.split()
            state["packages"][name] = version
        elif kind == "mokutil":
            mokutil.append(rest)
        elif kind == "kernel" and len(rest.split()) == 2:
            release, found = rest.split()
            state["kernels"][release] = found == "module"
        elif kind == "rebooted-for" and _VERSION.fullmatch(rest.strip()):
            state["rebooted_for"] = rest.strip()
    module = parse_proc_version(proc)
    state["module"] = module["version"] or sys_version
    state["flavour"] = module["flavour"] if state["module"] else None
    state["libraries"] = sorted(set(state["libraries"]))
    state["secure_boot"] = parse_mokutil_sb_state(mokutil)
    state["devices"] = sorted(state["devices"])
    return state


class AptVersions(TypedDict):
    installed: str | None
    candidate: str | None
    versions: list[str]


def parse_apt_policy(lines: Iterable[str]) -> dict[str, AptVersions]:
    """``apt-cache policy PKG...`` (LC_ALL=C): per package, what is installed, the candidate and
    every version in the table; a package apt does not know is absent."""
    found: dict[str, AptVersions] = {}
    current: AptVersions | None = None
    in_table = False
    for line in lines:
        if line and not line.startswith(" ") and line.rstrip().endswith(":"):
            current = {"installed": None, "candidate": None, "versions": []}
            found[line.strip()[:-1]] = current
            in_table = False
            continue
        if current is None:
            continue
        text = line.strip()
        if text.startswith("Installed:"):
            value = text.partition(":")[2].strip()
            current["installed"] = None if value == "(none)" else value
        elif text.startswith("Candidate:"):
            value = text.partition(":")[2].strip()
            current["candidate"] = None if value == "(none)" else value
        elif text.startswith("Version table:"):
            in_table = True
        elif in_table:
            parts = text.removeprefix("***").split()
            # A version row is "<version> <priority>"; its sources are "<priority> <uri> ...".
            if len(parts) == 2 and parts[1].lstrip("-").isdigit() and not parts[0].isdigit():
                current["versions"].append(parts[0])
    return found


class AptPolicy(FactBase[dict[str, AptVersions]]):
    """What apt would install for each package: ``{name: {installed, candidate, versions}}``.

    + packages: the package names

    Read from the host's current lists, without ``apt-get update``: planning changes nothing.
    """

    @staticmethod
    def default() -> dict[str, AptVersions]:
        return {}

    def command(self, packages: Sequence[str]) -> str:
        return f"LC_ALL=C apt-cache policy {' '.join(shlex.quote(p) for p in packages)} 2>/dev/null; true"

    def process(self, output):
        return parse_apt_policy(output)


def installed_driver(state: DriverState) -> str | None:
    """The installed user-space release: NVML's file, else the newest of the driver's packages."""
    if state["libraries"]:
        return max(state["libraries"], key=release_key)
    releases = [upstream_version(version) for version in state["packages"].values()]
    return max(releases, key=release_key) if releases else None


def reboot_needed(state: DriverState) -> tuple[str | None, str] | None:
    """(loaded module or None, installed release) when they differ, else None."""
    installed = installed_driver(state)
    if installed is None or state["module"] == installed:
        return None
    return state["module"], installed


def kernel_key(release: str) -> tuple[int, ...]:
    """``"6.8.0-50-generic"`` -> ``(6, 8, 0, 50)``: kernel releases in the order they were built."""
    return tuple(int(part) for part in re.findall(r"\d+", release))


def newest_kernel_without_module(state: DriverState) -> str | None:
    """The newest installed kernel, the one a reboot boots by default, when it has no NVIDIA module
    and a driver is installed; None otherwise."""
    if not state["kernels"] or installed_driver(state) is None:
        return None
    newest = max(state["kernels"], key=kernel_key)
    return None if state["kernels"][newest] else newest
