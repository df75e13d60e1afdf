"""The NVIDIA driver step (labfleet/nvidia_driver.py): parsers against recorded outputs, the
per-distribution plan, the floor rule, and what the step plans against fake facts."""

from __future__ import annotations

import subprocess
import time
from datetime import date
from types import SimpleNamespace

import pytest
from fakes import PlanningHost
from pyinfra.api import FileUploadCommand, FunctionCommand, StringCommand
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import LinuxDistribution

from labfleet import apt, compose, model, nvidia, nvidia_driver, planning, platform
from labfleet.facts.nvidia import GpuHost, parse_gpu_host
from labfleet.facts.nvidia_driver import (
    REBOOT_MARKER,
    AptPolicy,
    NvidiaDriver,
    installed_driver,
    newest_kernel_without_module,
    parse_apt_policy,
    parse_driver_state,
    parse_mokutil_sb_state,
    parse_proc_version,
    parse_sys_version,
    reboot_needed,
    upstream_version,
)
from labfleet.facts.updates import ContainerBusy
from labfleet.settings import SettingsError, build

# --- Recorded outputs --------------------------------------------------------------------------

# /proc/driver/nvidia/version of the open kernel modules on Ubuntu 24.04, nvidia-driver-565-open
# (nix-community/nixGL issue 186).
PROC_OPEN_565 = [
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  565.57.01  Release Build  "
    "(dvs-builder@U16-A24-9-2)  Thu Oct 10 12:15:00 UTC 2024",
    "GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)",
]
# The proprietary flavour on Ubuntu 18.04 (its format is the one NVIDIA's kernel_open README
# gives, quoted in NVIDIA/open-gpu-kernel-modules issue 171).
PROC_PROPRIETARY_515 = [
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  515.76  Mon Sep 12 19:21:56 UTC 2022",
    "GCC version:  gcc version 7.5.0 (Ubuntu 7.5.0-3ubuntu1~18.04)",
]
# Arch's nvidia-open-dkms 590 (nix-community/nixGL issue 220): the words moved again.
PROC_OPEN_590 = ["NVRM version: NVIDIA UNIX Open Kernel x86_64 Kernel Module  590.48.01  Mon Dec  8 11:22:45 UTC 2025"]
# A Jetson Orin NX, L4T 35.3.1 (nix-community/nixGL issue 139).
PROC_JETSON = [
    "NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  35.3.1  Release Build  "
    "(buildbrain@mobile-u64-6289-d7000)  Sun Mar 19 08:09:33 PDT 2023",
    "GCC version:  gcc version 9.3.0 (Buildroot 2020.08) ",
]

# `mokutil --sb-state` (sosreport/sos issue 1574; system76/firmware-open PR 388 for Setup Mode;
# darlinghq/darling issue 1025 for a machine without EFI variables).
MOKUTIL_ON = ["SecureBoot enabled"]
MOKUTIL_SETUP_MODE = ["SecureBoot disabled", "Platform is in Setup Mode"]
MOKUTIL_NO_EFI = ["EFI variables are not supported on this system"]

# `LC_ALL=C apt-cache policy nvidia-driver` against Debian 12's and 13's non-free lists,
# recorded 2026-12-02 (the archive's address replaced).
POLICY_BOOKWORM = """\
nvidia-driver:
  Installed: (none)
  Candidate: 535.261.03-1
  Version table:
     535.261.03-1 500
        500 http://archive.example/debian bookworm/non-free amd64 Packages
""".splitlines()
POLICY_TRIXIE = """\
nvidia-driver:
  Installed: (none)
  Candidate: 550.163.01-2
  Version table:
     550.163.01-2 500
        500 http://archive.example/debian trixie/non-free amd64 Packages
""".splitlines()
# The same package installed and held by labfleet's pin, with a newer one in the archive
# (apt-cache policy's own layout: *** marks the installed version, 100 the dpkg status).
POLICY_HELD = """\
nvidia-driver:
  Installed: 550.163.01-2
  Candidate: 550.163.01-2
  Version table:
     580.95.05-1 500
        500 http://archive.example/nvidia  Packages
 *** 550.163.01-2 1001
        500 http://archive.example/debian trixie/non-free amd64 Packages
        100 /var/lib/dpkg/status
""".splitlines()

# `apt-get -s install --no-install-recommends <packages>` on Debian 12 and 13 (amd64 and
# arm64 alike, recorded 2026-12-02): the driver-related packages apt would install.
SIMULATED_OLD_LIST = ["libnvidia-ml1", "firmware-nvidia-gsp", "nvidia-kernel-support", "nvidia-kernel-dkms"]
SIMULATED_NEW_LIST = ["libcuda1", "libnvidia-ml1", "firmware-nvidia-gsp", "nvidia-open-kernel-dkms", "nvidia-smi"]


@pytest.mark.parametrize(
    ("lines", "version", "flavour"),
    [
        (PROC_OPEN_565, "565.57.01", "open"),
        (PROC_PROPRIETARY_515, "515.76", "proprietary"),
        (PROC_OPEN_590, "590.48.01", "open"),
        (PROC_JETSON, "35.3.1", "open"),
        ([], None, None),
    ],
)
def test_proc_version_gives_the_module_and_its_flavour(lines, version, flavour):
    assert parse_proc_version(lines) == {"version": version, "flavour": flavour}


def test_sys_module_version():
    # /sys/module/nvidia/version holds the version alone; NVIDIA points tools there
    # (NVIDIA/open-gpu-kernel-modules discussion 297).
    assert parse_sys_version("570.86.15\n") == "570.86.15"
    assert parse_sys_version("") is None
    assert parse_sys_version("not a version") is None


@pytest.mark.parametrize(
    ("lines", "on"), [(MOKUTIL_ON, True), (MOKUTIL_SETUP_MODE, False), (MOKUTIL_NO_EFI, None), ([], None)]
)
def test_mokutil_secure_boot_state(lines, on):
    assert parse_mokutil_sb_state(lines) is on


def test_apt_policy_candidates():
    assert parse_apt_policy(POLICY_BOOKWORM) == {
        "nvidia-driver": {"installed": None, "candidate": "535.261.03-1", "versions": ["535.261.03-1"]}
    }
    assert parse_apt_policy(POLICY_TRIXIE)["nvidia-driver"]["candidate"] == "550.163.01-2"
    assert parse_apt_policy(POLICY_HELD)["nvidia-driver"] == {
        "installed": "550.163.01-2",
        "candidate": "550.163.01-2",
        "versions": ["580.95.05-1", "550.163.01-2"],
    }
    assert parse_apt_policy([]) == {}  # apt knows no such package (non-free not enabled yet)


@pytest.mark.parametrize(
    ("version", "release"),
    [("550.163.01-2", "550.163.01"), ("580.95.05-0ubuntu0.24.04.2", "580.95.05"), ("1:570.86.15-1", "570.86.15")],
)
def test_upstream_release_of_a_package_version(version, release):
    assert upstream_version(version) == release


# What NvidiaDriver's command prints on a mismatched host: an RTX 4090 (AD102, 0x2684), the
# proprietary 565 module still loaded, 570 user space installed by an unattended upgrade.
MISMATCHED = [
    "device 0x2684",
    "proc " + PROC_OPEN_565[0].replace("Open Kernel Module for x86_64", "x86_64 Kernel Module"),
    "sys 565.57.01",
    "nvml 570.86.15",
    "package libcuda1 570.86.15-1",
    "package libnvidia-ml1 570.86.15-1",
    "package nvidia-kernel-dkms 570.86.15-1",
    "mokutil SecureBoot disabled",
]


def test_driver_state_of_a_host_that_needs_a_reboot():
    state = parse_driver_state(MISMATCHED)
    assert state == {
        "devices": [0x2684],
        "module": "565.57.01",
        "flavour": "proprietary",
        "libraries": ["570.86.15"],
        "packages": {"libcuda1": "570.86.15-1", "libnvidia-ml1": "570.86.15-1", "nvidia-kernel-dkms": "570.86.15-1"},
        "secure_boot": False,
        "kernels": {},
        "rebooted_for": None,
    }
    assert reboot_needed(state) == ("565.57.01", "570.86.15")
    assert reboot_needed({**state, "module": "570.86.15"}) is None
    # /sys alone (no /proc entry read) still names the module
    assert parse_driver_state(["sys 570.86.15", "nvml 570.86.15"])["module"] == "570.86.15"
    # packages without NVML's file (a .run leftover removed): the newest package release
    assert installed_driver({**state, "libraries": []}) == "570.86.15"
    assert installed_driver(NvidiaDriver.default()) is None


# --- The plan per distribution -------------------------------------------------------------------

TRIXIE = platform.Distribution("debian", "trixie", 13)
BOOKWORM = platform.Distribution("debian", "bookworm", 12)
NOBLE = platform.Distribution("ubuntu", "noble", 24)
TODAY = date(2026, 12, 2)


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_debian_installs_libcuda_and_nvidia_smi(arch):
    plan = platform.nvidia_driver(TRIXIE, arch, "550", open_modules=True)
    assert not isinstance(plan, str)
    # The old list, simulated, lacked both; the new one has both (SIMULATED_*_LIST).
    assert "libcuda1" not in SIMULATED_OLD_LIST and "nvidia-smi" not in SIMULATED_OLD_LIST
    assert {"libcuda1", "nvidia-smi"} <= set(SIMULATED_NEW_LIST)
    assert plan.packages == (
        "nvidia-driver",
        "nvidia-open-kernel-dkms",
        "libcuda1",
        "nvidia-smi",
        "firmware-misc-nonfree",
        f"linux-headers-{arch}",
    )
    assert plan.release_driver == "550.163.01" and plan.signed_modules is False
    proprietary = platform.nvidia_driver(BOOKWORM, arch, "535", open_modules=False)
    assert not isinstance(proprietary, str) and "nvidia-kernel-dkms" in proprietary.packages
    assert proprietary.release_driver == "535.261.03"


def test_debian_on_an_architecture_without_the_driver():
    assert platform.nvidia_driver(TRIXIE, "ppc64el", "550", True) == (
        "Debian builds nvidia-driver for amd64, arm64 only, not ppc64el"
    )


@pytest.mark.parametrize(
    ("devices", "open_modules"),
    [
        ([0x1E02], True),  # TITAN RTX, the first Turing id in the open modules' table
        ([0x2684, 0x2B85], True),  # RTX 4090 and RTX 5090
        ([0x1B06], False),  # GTX 1080 Ti (Pascal): no GSP, proprietary only
        ([0x1DB4, 0x2230], False),  # a V100 beside an RTX A6000: NVIDIA keeps mixed hosts proprietary
        ([], True),  # nothing read: NVIDIA's default since R560
    ],
)
def test_open_kernel_modules_on_turing_and_newer(devices, open_modules):
    assert platform.open_kernel_modules(devices) is open_modules


@pytest.mark.parametrize(
    ("floor", "day", "branch"),
    [
        ("525.60.13", TODAY, "580"),  # R535 ended 2026-06, R570 2026-02
        ("525.60.13", date(2026, 1, 15), "580"),  # all three supported: the longest-lived
        ("580.65.06", TODAY, "580"),
        ("590", TODAY, None),  # no supported branch that high in the table
        ("525.60.13", date(2028, 9, 1), None),  # R580 ended too
    ],
)
def test_ubuntu_branch_is_supported_and_at_or_above_the_floor(floor, day, branch):
    assert platform.supported_branch(floor, day) == branch


def test_ubuntu_plan_is_open_unless_pre_turing():
    assert platform.nvidia_driver(NOBLE, "amd64", "580", True) == platform.DriverPlan(
        packages=("ubuntu-drivers-common",),
        ubuntu_drivers="nvidia:580-server-open",
        installed_when="nvidia-driver-580-server-open",
        driver_packages=("nvidia-driver-580-server-open",),
    )
    old = platform.nvidia_driver(NOBLE, "amd64", "580", False)
    assert not isinstance(old, str) and old.ubuntu_drivers == "nvidia:580-server"


def test_one_floor_rule_minor_version_compatibility():
    assert model.CUDA_DRIVER_FLOOR == {
        "11.8": "450.80.02",
        "12.1": "525.60.13",
        "12.4": "525.60.13",
        "12.6": "525.60.13",
        "12.8": "525.60.13",
        "12.9": "525.60.13",
        "13.0": "580.65.06",
    }


@pytest.mark.parametrize(
    ("driver", "floor", "ok"),
    [
        ("570.86.15", "570", True),
        ("569.99", "570", False),
        ("580.65.06", "570", True),
        ("525.60.13", "525.60.13", True),
        ("525.60.11", "525.60.13", False),
        ("535.261.03", "525.60.13", True),
        ("550.163.01", "580.65.06", False),
        (None, "525.60.13", False),
    ],
)
def test_driver_floor(driver, floor, ok):
    assert nvidia_driver.driver_meets(driver, floor) is ok


# --- Settings -------------------------------------------------------------------------------------


def test_pinned_release_needs_the_install_and_the_floor(raw):
    with pytest.raises(SettingsError) as err:
        build("pc07", {**raw, "nvidia_driver_version": "580.95.05"})
    assert str(err.value) == (
        "host pc07: nvidia_driver_version = '580.95.05' is invalid without nvidia_driver_install = true; "
        "expected nvidia_driver_install = true (labfleet installs the pinned release), or nvidia_driver_version = None"
    )
    with pytest.raises(SettingsError) as err:
        build("pc07", {**raw, "nvidia_driver_version": "550.163.01", "nvidia_driver_install": True, "cuda": "13.0"})
    assert str(err.value) == (
        "host pc07: nvidia_driver_version = '550.163.01' is invalid: it is below 580.65.06, the driver floor for "
        "cuda '13.0' (nvidia_driver_min); expected a release at or above 580.65.06"
    )
    ok = build("pc07", {**raw, "nvidia_driver_version": "580.95.05", "nvidia_driver_install": True})
    assert ok.nvidia_driver_version == "580.95.05"


# --- What the step plans, against fake facts ---------------------------------------------------


class Host(PlanningHost):
    """A PlanningHost that answers any fact it was not given with the fact's default."""

    def get_fact(self, fact, **kwargs):
        if fact is not planning.FactBatch and fact not in self.answers:
            return fact().default()
        if fact is planning.FactBatch:
            self.reads.append(fact)
            return [self.answers[cls] if cls in self.answers else cls().default() for cls, _ in kwargs["parts"]]
        return super().get_fact(fact, **kwargs)


DEBIAN_13 = {"name": "Debian", "major": 13, "release_meta": {"ID": "debian", "VERSION_CODENAME": "trixie"}}
UBUNTU_24 = {"name": "Ubuntu", "major": 24, "release_meta": {"ID": "ubuntu", "VERSION_CODENAME": "noble"}}


def facts(driver_lines, release=DEBIAN_13, policy=None, pin=None) -> dict:
    driver = parse_driver_state(driver_lines)
    proc = [line[5:] for line in driver_lines if line.startswith("proc ")]
    gpu = parse_gpu_host(["pci 0000:01:00.0 0x030000"] + [f"nvrm {p[len('NVRM version:') :]}" for p in proc])
    return {
        GpuHost: gpu,
        NvidiaDriver: driver,
        LinuxDistribution: release,
        DebArch: "amd64",
        DebPackages: {},
        FileContents: pin,
        AptPolicy: parse_apt_policy(policy or []),
    }


@pytest.fixture
def plan(monkeypatch):
    """plan(settings, facts) -> [(operation, kwargs)] that check_driver plans (requirements that fail included)."""

    def run(s, answers, day=TODAY):
        planned: list[tuple[str, dict]] = []
        fake = Host(answers)
        fake.name = fake.print_prefix = s.host
        for module in (planning, nvidia, nvidia_driver):
            monkeypatch.setattr(module, "host", fake)
        monkeypatch.setattr(nvidia_driver, "today", lambda: day)

        def recorder(name):
            def operation(**kwargs):
                planned.append((name, kwargs))
                return SimpleNamespace(did_change=lambda: True)

            return operation

        for name in (
            "hold_driver",
            "install_driver_packages",
            "install_ubuntu_driver",
            "reboot_when_idle",
            "refuse_reboot",
            "check_loaded_driver",
        ):
            monkeypatch.setattr(nvidia_driver, name, recorder(name))
        monkeypatch.setattr(nvidia_driver, "docker", SimpleNamespace(warn=recorder("warn")))
        monkeypatch.setattr(nvidia_driver.apt, "ensure_packages", recorder("ensure_packages"))
        monkeypatch.setattr(nvidia_driver.apt, "enable_apt_components", recorder("enable_apt_components"))
        monkeypatch.setattr(
            nvidia_driver,
            "require",
            lambda name, ok, problem: None if ok else planned.append(("require", {"name": name, "problem": problem})),
        )
        nvidia_driver.check_driver._inner(s)
        return planned

    return run


def problems(planned):
    return [kwargs["problem"] for name, kwargs in planned if name == "require"]


LOADED_570 = ["device 0x2684", "proc NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build"]


def test_secure_boot_without_a_module_names_the_cause_and_the_enrolment(settings, plan):
    lines = ["device 0x2684", "nvml 570.86.15", "package libcuda1 570.86.15-1", "mokutil SecureBoot enabled"]
    planned = plan(settings(gpu=True), facts(lines))
    (problem,) = problems(planned)
    assert problem.startswith(
        "host pc01: Secure Boot is on and NVIDIA driver 570.86.15 is installed but no NVIDIA kernel module is loaded"
    )
    assert "sudo mokutil --import /var/lib/dkms/mok.pub" in problem and "Enroll MOK" in problem
    # A deferred reboot after an install also leaves no module: the line says so too.
    assert problem.endswith(
        "If pc01 has not rebooted since the driver was installed, reboot it first: the module "
        "may only be waiting for it"
    )
    assert [name for name, _ in planned] == ["require"]  # nothing else is planned


def test_a_module_older_than_the_installed_driver_says_reboot_and_holds(settings, plan):
    planned = plan(settings(), facts(MISMATCHED))
    assert problems(planned) == []
    (warned,) = [kwargs for name, kwargs in planned if name == "warn"]
    assert warned["message"] == (
        "pc01 runs module 565.57.01 but 570.86.15 is installed: reboot pc01 "
        "(until then containers cannot use the GPU; the GPU check is skipped)"
    )
    (held,) = [kwargs for name, kwargs in planned if name == "hold_driver"]
    assert held["version"] is None
    assert "reboot_when_idle" not in [name for name, _ in planned]


def test_with_the_install_the_reboot_waits_for_idle_work_and_never_reboots_the_controller(raw, settings, plan):
    planned = plan(settings(nvidia_driver_install=True), facts(MISMATCHED))
    (reboot,) = [kwargs for name, kwargs in planned if name == "reboot_when_idle"]
    assert reboot["reason"] == "pc01 runs module 565.57.01 but 570.86.15 is installed: reboot pc01"
    assert reboot["containers"] == [compose.container_name(compose.project_name("alice"))]
    assert reboot["idle_seconds"] == 1800

    local = build("@local", {**raw, "nvidia_driver_install": True})
    planned = plan(local, facts(MISMATCHED))
    (refused,) = [kwargs for name, kwargs in planned if name == "refuse_reboot"]
    assert refused["reason"] == (
        "@local runs module 565.57.01 but 570.86.15 is installed: reboot @local; labfleet does not reboot the "
        "machine that runs the deploy: reboot it by hand (sudo reboot), then run the deploy again"
    )
    assert "reboot_when_idle" not in [name for name, _ in planned]


@pytest.mark.parametrize(
    "policy", [POLICY_TRIXIE, []], ids=["apt's candidate", "the release's known driver (non-free not enabled)"]
)
def test_debians_own_driver_below_the_floor_is_refused_before_installing(settings, plan, policy):
    planned = plan(settings(cuda="13.0", nvidia_driver_install=True), facts(["device 0x2684"], policy=policy))
    (problem,) = problems(planned)
    assert problem == (
        "host pc01: Debian 13's own NVIDIA driver is 550.163.01, below 580.65.06 (the floor for CUDA 13.0, or what "
        "the GPU needs), so labfleet does not install it (it would reboot into a host that still fails): install "
        "NVIDIA's driver from NVIDIA's CUDA repository by hand (NVIDIA's driver installation guide), or choose a "
        "cuda line whose floor it meets (12.x needs 525.60.13), or lower nvidia_driver_min"
    )
    assert [name for name, _ in planned] == ["require"]


def test_debian_installs_when_its_driver_meets_the_floor_then_holds_and_reboots(settings, plan):
    planned = plan(settings(nvidia_driver_install=True), facts(["device 0x2684"], policy=POLICY_TRIXIE))
    names = [name for name, _ in planned]
    assert problems(planned) == []
    assert names == [
        "install_driver_packages",
        "hold_driver",
        "reboot_when_idle",
        "check_loaded_driver",
    ]
    install = planned[0][1]
    assert install["packages"][:4] == ("nvidia-driver", "nvidia-open-kernel-dkms", "libcuda1", "nvidia-smi")
    assert planned[2][1]["reason"] == "pc01: labfleet installed nvidia-driver, which needs a reboot to load"
    assert planned[3][1]["problem"] == (
        "labfleet installed nvidia-driver and rebooted, and the driver loaded now is still below 525.60.13, the "
        "floor for CUDA 12.8: see dkms status and dmesg on pc01 (with Secure Boot, the module's key must be enrolled)"
    )


def test_blackwell_is_refused_debians_driver_and_needs_open_570(settings, plan):
    planned = plan(settings(nvidia_driver_install=True), facts(["device 0x2b85"], policy=POLICY_BOOKWORM))
    assert "535.261.03, below 570" in problems(planned)[0]
    old = ["device 0x2b85", "proc NVRM version: NVIDIA UNIX x86_64 Kernel Module  565.57.01  Thu Oct 10 2024"]
    (problem,) = problems(plan(settings(), facts(old)))
    assert problem.startswith(
        "host pc01: NVIDIA Blackwell GPU (PCI device 0x2b85) needs driver 570 or newer with NVIDIA's open kernel "
        "modules; loaded: 565.57.01 (proprietary)"
    )
    assert problems(plan(settings(), facts(["device 0x2b85", *LOADED_570[1:]]))) == []


def test_ubuntu_installs_a_supported_open_branch(settings, plan):
    planned = plan(settings(nvidia_driver_install=True), facts(["device 0x2684"], release=UBUNTU_24))
    (install,) = [kwargs for name, kwargs in planned if name == "install_ubuntu_driver"]
    assert (
        install["branch"] == "nvidia:580-server-open" and install["installed_when"] == "nvidia-driver-580-server-open"
    )
    pascal = plan(settings(nvidia_driver_install=True), facts(["device 0x1b06"], release=UBUNTU_24))
    (install,) = [kwargs for name, kwargs in pascal if name == "install_ubuntu_driver"]
    assert install["branch"] == "nvidia:580-server"


def test_a_pinned_release_is_held_before_it_is_installed(settings, plan):
    s = settings(nvidia_driver_install=True, nvidia_driver_version="580.95.05")
    planned = plan(s, facts([*LOADED_570, "nvml 570.86.15", "package libcuda1 570.86.15-1"], release=UBUNTU_24))
    names = [name for name, _ in planned]
    assert names.index("hold_driver") < names.index("install_ubuntu_driver")
    assert planned[names.index("install_ubuntu_driver")][1]["version"] == "580.95.05"


def test_a_converged_host_plans_nothing(settings, plan):
    lines = [*LOADED_570, "nvml 570.86.15", "package libcuda1 570.86.15-1", "package libnvidia-ml1 570.86.15-1"]
    pin = nvidia_driver.pin_text(["libcuda1", "libnvidia-ml1"], "570.86.15").splitlines()
    assert plan(settings(), facts(lines, pin=pin)) == []
    assert [name for name, _ in plan(settings(), facts(lines))] == ["hold_driver"]  # no pin yet


# --- The operations ----------------------------------------------------------------------------


def test_hold_pins_every_driver_package_at_the_release(fake_host_in, monkeypatch):
    fake = fake_host_in(nvidia_driver, {NvidiaDriver: parse_driver_state(MISMATCHED), FileContents: None})
    monkeypatch.setattr(apt, "host", fake)  # the hold is apt.hold_packages, as for the toolkit
    (upload,) = [c for c in nvidia_driver.hold_driver._inner() if isinstance(c, FileUploadCommand)]
    assert upload.src.getvalue() == (
        f"# {nvidia_driver.PIN_COMMENT}\n"
        "Package: libcuda1 libnvidia-ml1 nvidia-kernel-dkms\n"
        "Pin: version 570.86.15-*\n"
        "Pin-Priority: 1001\n"
    )
    assert upload.dest == nvidia_driver.PIN_FILE
    fake.facts[FileContents] = upload.src.getvalue().splitlines()
    assert list(nvidia_driver.hold_driver._inner()) == []
    assert fake.noops[-1] == (
        f"{nvidia_driver.PIN_FILE} already holds libcuda1, libnvidia-ml1, nvidia-kernel-dkms at 570.86.15"
    )
    # A pinned release also names what is about to be installed.
    pinned = nvidia_driver.hold_driver._inner(packages=("nvidia-driver",), version="580.95.05")
    (upload,) = [c for c in pinned if isinstance(c, FileUploadCommand)]
    text = upload.src.getvalue()
    assert "Package: libcuda1 libnvidia-ml1 nvidia-driver nvidia-kernel-dkms\nPin: version 580.95.05-*\n" in text
    fake.facts[NvidiaDriver] = NvidiaDriver.default()
    assert list(nvidia_driver.hold_driver._inner()) == []
    assert fake.noops[-1] == "no NVIDIA driver package is installed: nothing to hold"


def test_reboot_waits_while_a_container_is_busy(fake_host_in):
    busy = {"checked": True, "busy": True, "reasons": ["kernel 1a2b3c4d (python3) is busy"], "notes": []}
    fake = fake_host_in(nvidia_driver, {ContainerBusy: busy, NvidiaDriver: parse_driver_state(MISMATCHED)})
    commands = list(nvidia_driver.reboot_when_idle._inner("pc01 runs module 565.57.01 ...", ["c1"], 1800))
    assert commands == []
    assert fake.noops == [
        "pc01 runs module 565.57.01 ...; the reboot waits for running work (c1: kernel 1a2b3c4d (python3) is busy): "
        "run the deploy again once it is done"
    ]
    fake.facts[ContainerBusy] = {"checked": True, "busy": False, "reasons": [], "notes": []}
    commands = list(nvidia_driver.reboot_when_idle._inner("...", ["c1"], 1800))
    assert any(isinstance(c, StringCommand) and "reboot" in str(c) for c in commands)
    assert isinstance(commands[-1], FunctionCommand)


def test_the_reboot_writes_the_release_it_reboots_for_in_its_own_command(fake_host_in, tmp_path):
    """Run against a made-up marker path with a stand-in reboot (and sleep) on PATH: the marker
    is in place before reboot runs; a deferred reboot writes nothing."""
    idle = {"checked": True, "busy": False, "reasons": [], "notes": []}
    fake_host_in(nvidia_driver, {ContainerBusy: idle, NvidiaDriver: parse_driver_state(MISMATCHED)})
    marker, seen = tmp_path / "state" / "rebooted-for", tmp_path / "seen-by-reboot"
    commands = list(nvidia_driver.reboot_when_idle._inner("...", ["c1"], 1800, marker=str(marker)))
    (shell,) = [c for c in commands if isinstance(c, StringCommand)]  # one command: the marker, then the reboot
    assert isinstance(commands[-1], FunctionCommand)  # pyinfra's wait for the host to come back
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "reboot").write_text(f"#!/bin/sh\ncat {marker} > {seen}.tmp && mv {seen}.tmp {seen}\n")
    (bin_dir / "sleep").write_text("#!/bin/sh\n")
    for stand_in in bin_dir.iterdir():
        stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["sh", "-c", shell.get_raw_value()], env=env, timeout=60, check=True)
    for _ in range(600):  # the reboot is detached from the command (pyinfra's "( ... ) &")
        if seen.exists():
            break
        time.sleep(0.05)
    assert seen.read_text() == "570.86.15\n" == marker.read_text()
    assert parse_driver_state([f"rebooted-for {marker.read_text().strip()}"])["rebooted_for"] == "570.86.15"

    # Deferred by busy work: no command, so no marker either.
    busy = {"checked": True, "busy": True, "reasons": ["kernel 1a2b3c4d (python3) is busy"], "notes": []}
    fake_host_in(nvidia_driver, {ContainerBusy: busy, NvidiaDriver: parse_driver_state(MISMATCHED)})
    assert list(nvidia_driver.reboot_when_idle._inner("...", ["c1"], 1800, marker=str(tmp_path / "other"))) == []


def test_the_fact_reads_the_reboot_marker(tmp_path):
    """The fact's own shell, with the marker at a made-up path; a file that holds no release is ignored."""
    marker = tmp_path / "rebooted-for"
    command = NvidiaDriver().command().replace(REBOOT_MARKER, str(marker))
    assert REBOOT_MARKER in NvidiaDriver().command()

    def read() -> str | None:
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60, check=True)
        return parse_driver_state(done.stdout.splitlines())["rebooted_for"]

    assert read() is None
    marker.write_text("570.86.15\n")
    assert read() == "570.86.15"
    marker.write_text("garbage\n")
    assert read() is None


def test_a_module_that_stays_wrong_after_labfleets_reboot_is_not_rebooted_again(raw, settings, plan):
    install = settings(nvidia_driver_install=True)
    # No marker: the reboot is planned (and the marker is written when it runs).
    assert "reboot_when_idle" in [name for name, _ in plan(install, facts(MISMATCHED))]
    # A marker for an older release: the driver moved since, so it gets its one reboot.
    moved = plan(install, facts([*MISMATCHED, "rebooted-for 565.57.01"]))
    assert "reboot_when_idle" in [name for name, _ in moved] and problems(moved) == []
    # Rebooted for this release already and the module still differs: stop, say what to look at.
    again = plan(install, facts([*MISMATCHED, "rebooted-for 570.86.15"]))
    assert problems(again) == [
        "host pc01: labfleet rebooted pc01 for NVIDIA driver 570.86.15 and module 565.57.01 is still loaded, so it "
        "does not reboot again: see sudo dkms status, sudo journalctl -k | grep -i nvidia and mokutil --sb-state "
        "on pc01; fix the cause, reboot it by hand, and run the deploy again"
    ]
    assert [kwargs["name"] for name, kwargs in again if name == "require"] == [
        "Check that the NVIDIA module 570.86.15 loaded after labfleet's reboot"
    ]
    assert not {"reboot_when_idle", "refuse_reboot"} & {name for name, _ in again}
    # No module at all (a failed DKMS build, Secure Boot off or unknown).
    unloaded = ["device 0x2684", "nvml 570.86.15", "package libcuda1 570.86.15-1", "rebooted-for 570.86.15"]
    assert problems(plan(install, facts(unloaded))) == [
        "host pc01: labfleet rebooted pc01 for NVIDIA driver 570.86.15 and the NVIDIA module still does not load, "
        "so it does not reboot again: see sudo dkms status, sudo journalctl -k | grep -i nvidia and mokutil "
        "--sb-state on pc01; fix the cause, reboot it by hand, and run the deploy again"
    ]
    # Rebooted by hand and the module loads: nothing to say, whatever the marker holds.
    loaded = [*LOADED_570, "nvml 570.86.15", "package libcuda1 570.86.15-1", "rebooted-for 570.86.15"]
    assert problems(plan(install, facts(loaded))) == []
    # Without nvidia_driver_install labfleet never reboots: the plain reboot-needed line.
    (warned,) = [kw for name, kw in plan(settings(), facts([*MISMATCHED, "rebooted-for 570.86.15"])) if name == "warn"]
    assert warned["message"].startswith("pc01 runs module 565.57.01 but 570.86.15 is installed: reboot pc01")


def test_loaded_driver_is_checked_again_after_the_reboot(fake_host_in):
    fake = fake_host_in(nvidia_driver, {GpuHost: parse_gpu_host(["pci 0000:01:00.0 0x030000", "nvrm 570.86.15"])})
    assert list(nvidia_driver.check_loaded_driver._inner("570", "reboot")) == []
    fake.facts[GpuHost] = parse_gpu_host(["pci 0000:17:00.0 0x030200", "nouveau"])
    (command,) = list(nvidia_driver.check_loaded_driver._inner("570", "the branch is older"))
    assert "the loaded NVIDIA driver is none; the branch is older" in command and command.endswith("exit 1")


def test_install_at_a_pinned_release_checks_apts_candidate_first(fake_host_in):
    fake = fake_host_in(nvidia_driver, {DebPackages: {"nvidia-driver": ["570.86.15-1"], "libcuda1": ["570.86.15-1"]}})
    commands = list(nvidia_driver.install_driver_packages._inner(["nvidia-driver", "libcuda1"], "580.95.05"))
    assert "Candidate: 580.95.05-" in commands[1] and "apt offers no nvidia-driver 580.95.05" in commands[1]
    assert "install --no-install-recommends --allow-downgrades nvidia-driver libcuda1" in commands[2]
    assert list(nvidia_driver.install_driver_packages._inner(["nvidia-driver", "libcuda1"], "570.86.15")) == []
    assert fake.noops == ["nvidia-driver, libcuda1 already installed at 570.86.15"]


def test_advice_names_the_supported_package_and_the_obstacles(settings, monkeypatch):
    monkeypatch.setattr(nvidia_driver, "today", lambda: TODAY)
    fresh = parse_gpu_host(["pci 0000:17:00.0 0x030200", "nouveau", "secureboot 1"])
    ubuntu = nvidia_driver.driver_advice(settings(), {"name": "Ubuntu"}, fresh, [0x2684])
    assert "sudo apt install nvidia-driver-580-server-open`" in ubuntu
    assert "nouveau is loaded" in ubuntu and "Secure Boot is on" in ubuntu
    # A Pascal card (GTX 1080, 0x1b80) cannot run the open modules: the proprietary flavour is named.
    pascal = nvidia_driver.driver_advice(settings(), {"name": "Ubuntu"}, fresh, [0x1B80])
    assert "sudo apt install nvidia-driver-580-server`" in pascal
    debian = nvidia_driver.driver_advice(
        settings(), {"name": "Debian"}, {**fresh, "nouveau": False, "secure_boot": False}
    )
    assert "non-free" in debian and "Note" not in debian


def test_the_driver_is_not_installed_on_an_unsupported_distribution(settings, plan):
    fedora = {"name": "Fedora", "major": 41, "release_meta": {"ID": "fedora"}}
    (problem,) = problems(plan(settings(nvidia_driver_install=True), facts(["device 0x2684"], release=fedora)))
    assert problem.startswith("host pc01: NVIDIA driver none loaded is below 525.60.13, the floor for CUDA 12.8")
    assert problem.endswith(
        "host pc01: Fedora is not Debian or Ubuntu; labfleet installs NVIDIA drivers on Debian and Ubuntu only"
    )


def test_the_gpu_check_is_skipped_while_a_reboot_is_due(fake_host_in):
    fake = fake_host_in(nvidia, {NvidiaDriver: parse_driver_state(MISMATCHED)})
    assert list(nvidia.check_gpu_in_container._inner("labfleet/jupyterlab:pytorch-0123456789ab", "all")) == []
    assert fake.noops == ["the GPU check is skipped: module 565.57.01 is loaded, 570.86.15 installed (reboot needed)"]


def test_status_says_reboot_needed():
    from test_report import fleet, row

    from labfleet import report

    due = row("pc03", driver="565.57.01", gpus=1, reboot_needed=("565.57.01", "570.86.15"))
    rows = fleet(row("pc01"), due)
    reasons = report.drift(rows)
    assert reasons["pc03"] == ["reboot needed: NVIDIA module 565.57.01 loaded, 570.86.15 installed (reboot pc03)"]
    assert reasons["pc01"] == []
    text = report.table(rows, reasons)
    assert "565.57.01 (reboot needed)" in text
    assert "! pc03: reboot needed: NVIDIA module 565.57.01 loaded, 570.86.15 installed (reboot pc03)" in text


def test_secure_boot_without_any_driver_says_what_to_install(settings, plan):
    (problem,) = problems(plan(settings(gpu=True), facts(["device 0x2684", "mokutil SecureBoot enabled"])))
    assert problem.startswith(
        "host pc01: Secure Boot is on and no NVIDIA driver is installed: the kernel will load only a module signed by "
        "a key it trusts. Install one with signed modules (Ubuntu: sudo ubuntu-drivers install"
    )
    assert "set nvidia_driver_install: true" in problem and "sudo mokutil --import /var/lib/dkms/mok.pub" in problem


def test_debian_with_secure_boot_is_not_installed_unsigned(settings, plan):
    lines = ["device 0x2684", "mokutil SecureBoot enabled"]
    (problem,) = problems(plan(settings(nvidia_driver_install=True), facts(lines, policy=POLICY_TRIXIE)))
    assert "Secure Boot is on, and Debian's nvidia-driver is a DKMS module that must be signed" in problem
    # Ubuntu's modules come signed: it installs.
    ubuntu = plan(settings(nvidia_driver_install=True), facts(lines, release=UBUNTU_24))
    assert problems(ubuntu) == [] and "install_ubuntu_driver" in [name for name, _ in ubuntu]


def test_installed_but_not_loaded_says_reboot(settings, plan):
    planned = plan(settings(), facts(["device 0x2684", "nvml 570.86.15", "package libcuda1 570.86.15-1"]))
    (warned,) = [kwargs for name, kwargs in planned if name == "warn"]
    assert warned["message"].startswith(
        "pc01 has NVIDIA driver 570.86.15 installed but no NVIDIA module loaded: reboot pc01"
    )


# Ubuntu 24.04 after an unattended kernel update while the driver is held: the running kernel has
# Canonical's signed module, the new one none (its linux-modules-nvidia-580-server-open-* needs
# nvidia-kernel-common-580-server >= the archive's newer release, which the hold keeps out).
NEW_KERNEL_WITHOUT_MODULE = [
    "kernel 6.8.0-49-generic module",
    "kernel 6.8.0-51-generic none",
    "kernel 6.8.0-9-generic module",  # sorts by number, not by text
]


def test_the_newest_kernel_without_a_module_is_found_only_with_a_driver_installed():
    converged = [*LOADED_570, "nvml 570.86.15", "package libcuda1 570.86.15-1"]
    state = parse_driver_state([*converged, *NEW_KERNEL_WITHOUT_MODULE])
    assert state["kernels"] == {"6.8.0-49-generic": True, "6.8.0-51-generic": False, "6.8.0-9-generic": True}
    assert newest_kernel_without_module(state) == "6.8.0-51-generic"
    assert newest_kernel_without_module(parse_driver_state([*converged, *NEW_KERNEL_WITHOUT_MODULE[:1]])) is None
    assert newest_kernel_without_module(parse_driver_state(NEW_KERNEL_WITHOUT_MODULE)) is None  # no driver


def test_the_fact_finds_each_kernels_module_where_each_packaging_puts_it(tmp_path):
    """The fact's own shell, run against a made-up /boot and /lib/modules."""
    modules, boot = tmp_path / "lib" / "modules", tmp_path / "boot"
    layouts = {
        "6.8.0-49-generic": "kernel/nvidia-580srv-open/nvidia.ko",  # Ubuntu's signed modules
        "6.12.48+deb13-amd64": "updates/dkms/nvidia-current.ko.xz",  # Debian's DKMS build
        "6.12.57+deb13-amd64": None,  # DKMS failed for it
        "6.1.0-9-amd64": "kernel/fs/ext4/ext4.ko",  # removed kernel: modules left, no vmlinuz
    }
    for release, module in layouts.items():
        (modules / release).mkdir(parents=True)
        if module:
            (modules / release / module).parent.mkdir(parents=True, exist_ok=True)
            (modules / release / module).write_text("")
        if not release.startswith("6.1.0"):
            boot.mkdir(exist_ok=True)
            (boot / f"vmlinuz-{release}").write_text("")
    command = NvidiaDriver().command().replace("/lib/modules/", f"{modules}/").replace("/boot/", f"{boot}/")
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60, check=True)
    kernels = parse_driver_state(done.stdout.splitlines())["kernels"]
    assert kernels == {"6.8.0-49-generic": True, "6.12.48+deb13-amd64": True, "6.12.57+deb13-amd64": False}


def test_a_next_kernel_without_a_module_is_said_before_the_reboot(settings, plan):
    converged = [*LOADED_570, "nvml 570.86.15", "package libcuda1 570.86.15-1", *NEW_KERNEL_WITHOUT_MODULE]
    (warned,) = [kwargs for name, kwargs in plan(settings(), facts(converged, release=UBUNTU_24)) if name == "warn"]
    assert warned["message"] == (
        "pc01: kernel 6.8.0-51-generic, the newest installed and the one a reboot starts, has no NVIDIA module, "
        "so after the next reboot the GPU is gone; Ubuntu's signed NVIDIA modules for it need the driver release "
        "its archive has now, newer than the one held: set nvidia_driver_version to that release (apt-cache "
        "policy lists it) with nvidia_driver_install = true, and deploy before rebooting"
    )
    (warned,) = [kwargs for name, kwargs in plan(settings(), facts(converged)) if name == "warn"]
    assert warned["message"].endswith(
        "DKMS did not build it: see sudo dkms status, then sudo dkms autoinstall -k 6.8.0-51-generic on pc01"
    )


def test_a_reboot_into_a_driver_below_the_floor_is_said_too(settings, plan):
    lines = ["device 0x2684", "sys 470.256.02", "nvml 520.61.05", "package libcuda1 520.61.05-1"]
    (problem,) = problems(plan(settings(), facts(lines)))
    assert problem.startswith(
        "host pc01: NVIDIA driver 520.61.05 (installed) is below 525.60.13, the floor for CUDA 12.8"
    )


def test_blackwell_beside_a_pre_turing_gpu_and_no_supported_branch(settings, plan):
    (problem,) = problems(plan(settings(nvidia_driver_install=True), facts(["device 0x1b06", "device 0x2b85"])))
    assert problem.endswith(
        "a Blackwell GPU needs NVIDIA's open kernel modules and an older GPU in the same host cannot run them; "
        "put the cards in different hosts"
    )
    late = plan(settings(nvidia_driver_install=True), facts(["device 0x2684"], release=UBUNTU_24), day=date(2029, 1, 1))
    (problem,) = problems(late)
    assert "no NVIDIA driver branch labfleet knows of is supported on 2029-01-01 and at least 525.60.13" in problem


def test_a_held_driver_below_a_new_floor_is_released_for_the_install(settings, plan, monkeypatch):
    """cuda moved to 13.0 over a held 570: apt's candidate is the held release, the newest in
    its table decides, the hold is lifted for the install and set again after it."""
    lines = [*LOADED_570, "nvml 570.86.15", "package nvidia-driver 570.86.15-1"]
    pin = nvidia_driver.pin_text(["nvidia-driver"], "570.86.15").splitlines()
    removed = []
    monkeypatch.setattr(nvidia_driver.files, "file", lambda **kwargs: removed.append(kwargs))
    planned = plan(settings(cuda="13.0", nvidia_driver_install=True), facts(lines, policy=POLICY_HELD, pin=pin))
    assert problems(planned) == []
    assert removed == [
        {
            "name": "Lift the hold of the NVIDIA driver below the floor to install",
            "path": nvidia_driver.PIN_FILE,
            "present": False,
        }
    ]
    # (the fake answers the sources files with the pin's text too, so non-free is "enabled" there first)
    assert [name for name, _ in planned if name != "enable_apt_components"] == [
        "install_driver_packages",
        "hold_driver",
        "reboot_when_idle",
        "check_loaded_driver",
    ]
    # Without anything newer in apt's table, the refusal names the held release.
    policy = [line for line in POLICY_HELD if "580.95.05" not in line and "archive.example/nvidia" not in line]
    (problem,) = problems(plan(settings(cuda="13.0", nvidia_driver_install=True), facts(lines, policy=policy, pin=pin)))
    assert "Debian 13's own NVIDIA driver is 550.163.01, below 580.65.06" in problem
