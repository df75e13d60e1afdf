"""GPU detection and the driver floor, from recorded sysfs and /proc output."""

import pytest

from labfleet import nvidia
from labfleet.facts import parse_gpu_host
from labfleet.settings import build

# A workstation with an RTX 4090 (VGA class) and its audio function, driver 570 loaded.
RTX_WORKSTATION = [
    "pci 0000:01:00.0 0x030000",
    "pci 0000:01:00.1 0x040300",
    "driver-gpu 0000:01:00.0",
    "nvrm NVIDIA UNIX x86_64 Kernel Module  570.86.15  Wed Jan 22 18:25:35 UTC 2025",
    "secureboot 0",
]
# A server with two data-centre cards (3D controller class) and no driver yet, nouveau loaded.
FRESH_SERVER = ["pci 0000:17:00.0 0x030200", "pci 0000:65:00.0 0x030200", "nouveau", "secureboot 1"]
# A CPU-only box: an Intel GPU and nothing from NVIDIA (sysfs filtered by vendor prints nothing).
CPU_ONLY: list[str] = []


def test_workstation_with_driver():
    state = parse_gpu_host(RTX_WORKSTATION)
    assert state == {"gpus": ["0000:01:00.0"], "driver": "570.86.15", "nouveau": False, "secure_boot": False}


def test_fresh_server_without_driver():
    state = parse_gpu_host(FRESH_SERVER)
    assert state == {"gpus": ["0000:17:00.0", "0000:65:00.0"], "driver": None, "nouveau": True, "secure_boot": True}


def test_cpu_only_host():
    assert parse_gpu_host(CPU_ONLY)["gpus"] == []


@pytest.mark.parametrize(
    ("driver", "floor", "ok"),
    [
        ("570.86.15", "570", True),
        ("569.99", "570", False),
        ("580.65.06", "570", True),
        ("525.60.13", "525.60.13", True),
        ("525.60.11", "525.60.13", False),
        ("535.54.03", "525.60.13", True),
        (None, "525.60.13", False),
    ],
)
def test_driver_floor(driver, floor, ok):
    assert nvidia.driver_meets(driver, floor) is ok


def test_advice_names_the_package_and_the_obstacles(raw):
    settings = build("gpu01", raw)
    ubuntu = nvidia.driver_advice(settings, {"name": "Ubuntu"}, parse_gpu_host(FRESH_SERVER))
    assert "nvidia-driver-570-server" in ubuntu
    assert "nouveau is loaded" in ubuntu and "Secure Boot is on" in ubuntu
    debian = nvidia.driver_advice(settings, {"name": "Debian"}, parse_gpu_host(RTX_WORKSTATION))
    assert "non-free" in debian and "Note" not in debian


def test_gpu_setting_overrides_detection(raw, monkeypatch):
    monkeypatch.setattr(nvidia, "host", None)  # no host is asked when the setting decides
    assert nvidia.has_gpu(build("pc01", {**raw, "gpu": True})) is True
    assert nvidia.has_gpu(build("pc01", {**raw, "gpu": False})) is False
