"""labfleet/nvidia_driver.py end to end: the real pyinfra CLI over SSH against a systemd test host.

No GPU and no NVIDIA driver is reachable here, so the host is made to look like a lab PC
after an unattended upgrade with STAND-INs: /proc/driver/nvidia/version on a tmpfs says the
565.57.01 module is loaded (nvidia_standin.simulate_driver), and STAND-IN packages under
Debian's names and source put the 570.86.15 user space in place, from a local flat apt
repository that also offers 580.95.05 (tests/e2e/nvidia_driver_standin.py). A stand-in
mokutil reports Secure Boot, a marker written by hand stands in for a reboot labfleet did (a
test host cannot reboot), and a STAND-IN kernel (an empty vmlinuz and module directory) plays
an update that DKMS built no module for. No kernel module and no GPU is involved.

Every deploy runs tests/e2e/deploys/nvidia_driver_step.py (preflight, the driver step, the
image's GPU check) and is run again to show that the second run changes nothing.
"""

from __future__ import annotations

import pytest

from labfleet import nvidia_driver
from labfleet.facts.nvidia_driver import REBOOT_MARKER

from . import nvidia_driver_standin, nvidia_standin
from .harness.hosts import TestHost, host_exec
from .harness.runner import assert_converged, assert_no_changes

pytestmark = pytest.mark.e2e

DRIVER_STEP = "tests/e2e/deploys/nvidia_driver_step.py"
DATA = {"extra_ca_certificates": [], "nvidia_toolkit": False}


def sh(host: TestHost, command: str) -> str:
    return host_exec(host, command, timeout=120).stdout


def test_reboot_needed_hold_and_secure_boot_on_a_stand_in_host(make_hosts, pyinfra_run):
    """An unattended upgrade left 570.86.15 installed under the loaded 565.57.01 module.

    The deploy says which host to reboot and skips the GPU check there instead of failing on
    NVML; it holds the driver's packages with an apt pin, so apt-get upgrade no longer moves
    them although the repository offers 580.95.05. With the module gone and Secure Boot on,
    the host stops with the cause and the mokutil enrolment steps, and nothing changes.
    """
    (host,) = make_hosts(1)
    nvidia_driver_standin.build_repo(host, ("570.86.15", "580.95.05"))
    nvidia_driver_standin.install(host, "570.86.15")
    nvidia_standin.simulate_driver(host, "565.57.01")
    nvidia_driver_standin.secure_boot(host, False)

    first = pyinfra_run([host], deploy=DRIVER_STEP, data=DATA)
    assert_converged(first)
    output = first.stdout + first.stderr
    assert f"{host.name} runs module 565.57.01 but 570.86.15 is installed: reboot {host.name}" in output
    assert first.status(host, "Reboot needed: module 565.57.01 loaded, driver 570.86.15 installed") == "no_change"
    assert first.status(host, "Check that the lab image sees the GPU (nvidia-smi and the smoke test)") == "no_change"
    assert first.changed(host) == [
        "Check the NVIDIA driver | Hold the NVIDIA driver packages against apt upgrade and unattended-upgrades"
    ]
    assert sh(host, f"cat {nvidia_driver.PIN_FILE}") == nvidia_driver.pin_text(
        nvidia_driver_standin.PACKAGES, "570.86.15"
    )

    # The hold: apt's candidate is the installed release, so an upgrade (by hand, or the
    # candidates unattended-upgrades installs) leaves it, though 580.95.05 is offered.
    upgrade = sh(host, "apt-get -q update >/dev/null 2>&1; LC_ALL=C apt-get -s upgrade; apt-cache policy libcuda1")
    assert "Inst libcuda1" not in upgrade and "Inst libnvidia-ml1" not in upgrade
    assert "Candidate: 570.86.15-1" in upgrade and "580.95.05-1 500" in upgrade
    host_exec(host, "DEBIAN_FRONTEND=noninteractive apt-get -y -q upgrade >/dev/null", timeout=120)
    assert sh(host, "dpkg-query -W -f '${Version}' libnvidia-ml1") == "570.86.15-1"

    assert_no_changes(pyinfra_run([host], deploy=DRIVER_STEP, data=DATA))

    # labfleet already rebooted this host for 570.86.15 (the marker its reboot command writes,
    # put there by hand: a test host cannot reboot) and 565.57.01 is still loaded: with
    # nvidia_driver_install it does not reboot again but stops the host with what to look at.
    sh(host, f"mkdir -p /var/lib/labfleet/nvidia && echo 570.86.15 > {REBOOT_MARKER}")
    install = {**DATA, "nvidia_driver_install": True}
    stopped = pyinfra_run([host], deploy=DRIVER_STEP, data=install, expect_fail=True)
    assert (
        f"host {host.name}: labfleet rebooted {host.name} for NVIDIA driver 570.86.15 and module 565.57.01 is still "
        "loaded, so it does not reboot again: see sudo dkms status" in stopped.stdout + stopped.stderr
    )
    assert stopped.errors() == [
        (host.name, "Check the NVIDIA driver | Check that the NVIDIA module 570.86.15 loaded after labfleet's reboot")
    ]
    assert "Starting operation: Check the NVIDIA driver | Reboot" not in stopped.stderr
    assert sh(host, f"cat {REBOOT_MARKER}") == "570.86.15\n"
    sh(host, f"rm {REBOOT_MARKER}")

    # A STAND-IN kernel update: a newer kernel image and its module directory, with no NVIDIA
    # module in it (DKMS did not build one). The deploy warns before the reboot that would
    # start it without the GPU, and changes nothing.
    kernel = "6.12.99+deb13-amd64"
    sh(host, f"mkdir -p /lib/modules/{kernel}/kernel && touch /boot/vmlinuz-{kernel}")
    warned = pyinfra_run([host], deploy=DRIVER_STEP, data=DATA)
    assert_no_changes(warned)
    assert (
        f"{host.name}: kernel {kernel}, the newest installed and the one a reboot starts, has no NVIDIA module, so "
        f"after the next reboot the GPU is gone; DKMS did not build it: see sudo dkms status, then sudo dkms "
        f"autoinstall -k {kernel} on {host.name}" in warned.stdout + warned.stderr
    )
    sh(host, f"rm -rf /lib/modules/{kernel} /boot/vmlinuz-{kernel}")

    # CUDA 13 needs 580.65.06: Debian 13's own driver (550.163.01; non-free is not even
    # enabled here, so apt has no candidate and the release's known driver decides) can
    # never reach it, so the install is refused before anything changes.
    cuda13 = {**DATA, "cuda": "13.0", "nvidia_driver_install": True}
    refused = pyinfra_run([host], deploy=DRIVER_STEP, data=cuda13, expect_fail=True)
    assert (
        f"host {host.name}: Debian 13's own NVIDIA driver is 550.163.01, below 580.65.06 (the floor for CUDA 13.0"
        in refused.stdout + refused.stderr
    )
    assert "NVIDIA's CUDA repository" in refused.stdout + refused.stderr
    assert "non-free" not in sh(host, "cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null; true")

    # Secure Boot on and no module loaded (the kernel refused the unsigned one).
    nvidia_standin.simulate_driver(host, None)
    nvidia_driver_standin.secure_boot(host, True)
    refused = pyinfra_run([host], deploy=DRIVER_STEP, data={**DATA, "gpu": True}, expect_fail=True)
    output = refused.stdout + refused.stderr
    assert (
        f"host {host.name}: Secure Boot is on and NVIDIA driver 570.86.15 is installed but no NVIDIA kernel module "
        "is loaded" in output
    )
    assert "sudo mokutil --import /var/lib/dkms/mok.pub" in output and "Enroll MOK" in output
    assert refused.errors() == [
        (host.name, "Check the NVIDIA driver | Check that Secure Boot lets the NVIDIA module load")
    ]
    # It stopped before anything changed: the hold is as it was.
    assert sh(host, f"cat {nvidia_driver.PIN_FILE}") == nvidia_driver.pin_text(
        nvidia_driver_standin.PACKAGES, "570.86.15"
    )
    assert "Starting operation: Check the NVIDIA driver | Hold" not in refused.stderr
