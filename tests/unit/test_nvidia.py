"""labfleet/nvidia.py: detection, the one batch the NVIDIA steps read, the toolkit (source, key, pin, floor,
hold) and the GPU check, from recorded sysfs, /proc and command output and against fake facts."""

import functools
import subprocess

import pytest
from fakes import PlanningHost
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import LinuxDistribution
from test_gpu_architecture import TITAN_V_AND_ADA

from labfleet import apt, docker, gpu_architecture, nvidia, nvidia_driver, nvidia_runtime, planning
from labfleet.facts.apt import AptSourceEntries
from labfleet.facts.docker import AppArmorEnabled, DaemonJson, DockerEngineStatus
from labfleet.facts.nvidia import (
    GpuArchitectures,
    GpuHost,
    GpuInContainer,
    NvidiaRuntimeState,
    parse_gpu_architectures,
    parse_gpu_host,
    parse_gpu_in_container,
    parse_nvidia_runtime_state,
)
from labfleet.facts.nvidia_driver import NvidiaDriver
from labfleet.facts.system import GroupMembers, ServiceState
from labfleet.planning import FactBatch
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


def test_gpu_setting_overrides_detection(raw, monkeypatch):
    monkeypatch.setattr(nvidia, "host", None)  # no host is asked when the setting decides
    assert nvidia.has_gpu(build("pc01", {**raw, "gpu": True})) is True
    assert nvidia.has_gpu(build("pc01", {**raw, "gpu": False})) is False


# --- Planning against fake facts ----------------------------------------------------------


@pytest.fixture
def fake_host(fake_host_in, monkeypatch):
    """One FakeHost where every NVIDIA module reads `host`."""

    def install(facts=None, executing=True):
        fake = fake_host_in(nvidia, facts, executing)
        for module in (nvidia_driver, nvidia_runtime, gpu_architecture):
            monkeypatch.setattr(module, "host", fake)
        return fake

    return install


def test_toolkit_setting_decides_before_detection(settings, monkeypatch):
    monkeypatch.setattr(nvidia, "host", None)
    assert nvidia.wants_toolkit(settings(nvidia_toolkit=True, gpu=False)) is True
    assert nvidia.wants_toolkit(settings(nvidia_toolkit=False, gpu=True)) is False
    assert nvidia.wants_toolkit(settings(nvidia_toolkit="auto", gpu=True)) is True


# The runtime as NvidiaRuntimeState reads it on a converged host (labfleet.nvidia_runtime).
RUNTIME_STATE = [
    "spec",
    "spec-for 570.86.15 1.17.8-1",
    "hook-changed 1700000100",
    "service-started 1700000200",
]


def host_facts(gpu=RTX_WORKSTATION, daemon_json=None) -> dict:
    """A converged stand-in toolkit host as every NVIDIA fact reads it."""
    return {
        GpuHost: parse_gpu_host(gpu),
        LinuxDistribution: {
            "name": "Debian",
            "major": 13,
            "release_meta": {"ID": "debian", "VERSION_CODENAME": "trixie"},
        },
        DebArch: "amd64",
        DebPackages: {name: ["1.17.8-1"] for name in nvidia.TOOLKIT_PACKAGES},
        AptSourceEntries: {
            "files": [{"path": nvidia.SOURCES_FILE, "entries": 1, "matching": 1}],
            "present": [],
            "sha256": {},
        },
        DaemonJson: {"present": True, "config": daemon_json or {}, "error": None},
        NvidiaRuntimeState: parse_nvidia_runtime_state(RUNTIME_STATE),
        ServiceState: {"systemd": True, "active": "active", "enabled": "enabled"},
        GpuArchitectures: parse_gpu_architectures(TITAN_V_AND_ADA),
        # The docker step's own facts, which deploy.py reads in the same batch.
        AppArmorEnabled: False,
        DockerEngineStatus: {"server": "26.1.5", "compose": "2.26.1"},
        GroupMembers: {"exists": True, "members": ["alice"], "accounts": ["alice"]},
    }


def make_planning_hosts(monkeypatch, **answers):
    """{name: PlanningHost} for answers (name: facts), and use(name), which makes that host pyinfra's `host`
    wherever the NVIDIA steps read it; test_nvidia_runtime.py plans with it too."""
    hosts = {name: PlanningHost(facts) for name, facts in answers.items()}
    for name, fake in hosts.items():
        fake.name, fake.print_prefix = name, f"[{name}] "

    def use(name):
        for module in (planning, nvidia, nvidia_runtime, gpu_architecture):
            monkeypatch.setattr(module, "host", hosts[name])
        return hosts[name]

    return hosts, use


@pytest.fixture
def planning_hosts(monkeypatch):
    """planning_hosts(name=facts, ...) -> (hosts, use): make_planning_hosts."""
    return functools.partial(make_planning_hosts, monkeypatch)


def test_every_nvidia_step_reads_one_batch_per_host(settings, planning_hosts):
    """What deploy.py reads ahead answers every NVIDIA decision: one round trip per host."""
    hosts, use = planning_hosts(gpu01=host_facts(), cpu01=host_facts(gpu=CPU_ONLY))
    s = settings()
    for name in hosts:
        use(name)
        planning.read_ahead(nvidia.reads(s), nvidia_runtime.reads(s), gpu_architecture.reads(s), docker.reads(s))
    for name, gpu in (("gpu01", True), ("cpu01", False)):
        use(name)
        assert nvidia.has_gpu(s) is gpu and nvidia.wants_toolkit(s) is gpu and nvidia.has_gpu(s) is gpu
        assert nvidia.snapshot(s).packages
        runtime = nvidia_runtime.snapshot(s)
        assert runtime.runtime["spec_for"] == "570.86.15 1.17.8-1" and runtime.cdi_refresh["active"] == "active"
        gpus = planning.read(gpu_architecture.reads(s))["architectures"]
        assert [gpu["compute_cap"] for gpu in gpus] == [(7, 0), (8, 9)]
        assert ("runtimes" in nvidia_runtime.daemon_keys(s)) is gpu
    assert {name: fake.reads for name, fake in hosts.items()} == {"gpu01": [FactBatch], "cpu01": [FactBatch]}


def test_auto_reads_the_gpu_fact_once_per_host(settings, planning_hosts):
    """Without deploy.py's read-ahead, the NVIDIA steps still read each host once."""
    hosts, use = planning_hosts(pc01=host_facts(), pc02=host_facts(gpu=FRESH_SERVER))
    s = settings()
    for name in hosts:
        use(name)
        assert nvidia.has_gpu(s) and nvidia.wants_toolkit(s) and nvidia.has_gpu(s)
        assert nvidia.snapshot(s).gpu["gpus"]
    assert {name: fake.reads for name, fake in hosts.items()} == {
        "pc01": [GpuHost, FactBatch],
        "pc02": [GpuHost, FactBatch],
    }


def test_gpu_false_reads_nothing_unless_the_toolkit_is_wanted(settings):
    for step in (nvidia, nvidia_runtime, gpu_architecture):
        assert step.reads(settings(gpu=False)) == {}
    assert "packages" in nvidia.reads(settings(gpu=False, nvidia_toolkit=True))
    assert "runtime" in nvidia_runtime.reads(settings(gpu=False, nvidia_toolkit=True))
    assert "debian_sources" in nvidia.reads(settings(nvidia_driver_install=True))


# --- Toolkit source, key, pin -----------------------------------------------------------------


def test_sources_file_is_a_flat_deb822_repository_per_architecture(settings):
    s = settings()
    text = apt.sources_text(nvidia.repository(s), nvidia.apt_source(s, "arm64"))
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "Types: deb",
        "URIs: https://nvidia.github.io/libnvidia-container/stable/deb/arm64",
        "Suites: /",
        "Architectures: arm64",
        "Signed-By: /etc/apt/keyrings/nvidia-container-toolkit.asc",
    ]


@pytest.mark.parametrize(
    ("mirror", "key", "expected"),
    [
        (
            "https://nvidia.github.io/libnvidia-container/stable/deb",
            None,
            "https://nvidia.github.io/libnvidia-container/gpgkey",
        ),
        (
            "http://apt.lab:8080/nvidia.github.io/libnvidia-container/stable/deb/",
            None,
            "http://apt.lab:8080/nvidia.github.io/libnvidia-container/gpgkey",
        ),
        ("http://apt.lab/aptly/nvidia", "http://apt.lab/keys/nvidia.asc", "http://apt.lab/keys/nvidia.asc"),
    ],
)
def test_key_url_follows_nvidias_layout_unless_set(settings, mirror, key, expected):
    assert nvidia.key_url(settings(nvidia_toolkit_apt_mirror=mirror, nvidia_toolkit_apt_key=key)) == expected


def pin_text(s):
    return apt.pin_text(nvidia.repository(s), nvidia.apt_source(s, "amd64"))


def test_version_pins_all_four_packages_together(settings):
    assert nvidia.toolkit_packages(settings()) == nvidia.TOOLKIT_PACKAGES
    assert pin_text(settings()) is None
    pinned = settings(nvidia_toolkit_version="1.17.8-1")
    assert nvidia.toolkit_packages(pinned) == tuple(f"{name}=1.17.8-1" for name in nvidia.TOOLKIT_PACKAGES)
    pin = pin_text(pinned)
    assert nvidia.repository(pinned).pin_file == nvidia.PIN_FILE
    assert "Package: nvidia-container-toolkit nvidia-container-toolkit-base libnvidia-container-tools " in pin
    assert "libnvidia-container1\nPin: version 1.17.8-1\nPin-Priority: 1001\n" in pin


def test_nvidias_guide_list_goes_and_mixed_files_are_reported(settings):
    entries = {
        "files": [
            {"path": nvidia.SOURCES_FILE, "entries": 1, "matching": 1},
            {"path": "/etc/apt/sources.list.d/nvidia-container-toolkit.list", "entries": 1, "matching": 1},
            {"path": "/etc/apt/sources.list.d/lab.list", "entries": 3, "matching": 1},
            {"path": "/etc/apt/sources.list", "entries": 1, "matching": 1},
        ],
        "present": [nvidia.KEYRING, nvidia.PIN_FILE, "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"],
        "sha256": {},
    }
    repo, source = nvidia.repository(settings()), nvidia.apt_source(settings(), "amd64")
    # Without nvidia_toolkit_version the pin file is the hold at the installed version: it stays.
    assert apt.stale_files(repo, source, entries) == [
        "/etc/apt/sources.list.d/nvidia-container-toolkit.list",
        "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg",
    ]
    mixed = apt.mixed_files(repo, source, entries)
    assert mixed == ["/etc/apt/sources.list.d/lab.list", "/etc/apt/sources.list"]
    assert apt.mixed_problem(repo, "pc01", mixed) == (
        "host pc01: /etc/apt/sources.list.d/lab.list, /etc/apt/sources.list mixes NVIDIA's apt entries with "
        "other repositories'; labfleet does not edit other repositories' files: move NVIDIA's entries out "
        f"(labfleet writes {nvidia.SOURCES_FILE}), then run the deploy again"
    )
    assert nvidia.repository_markers(settings(nvidia_toolkit_apt_mirror="http://apt.lab/nv")) == (
        "nvidia.github.io/libnvidia-container/",
        "apt.lab/nv/",
    )


# --- Verify -----------------------------------------------------------------------------------

SMOKE_OK = [
    "GPU 0: NVIDIA GeForce RTX 4090 (UUID: GPU-0a1b2c3d-0000-1111-2222-333344445555)",
    "profile pytorch, Python 3.12.3",
    "CUDA available: True, devices: 1",
    "smoke test passed",
    "labfleet-rc=0",
]


@pytest.mark.parametrize(
    ("devices", "flag"),
    [
        ("all", "all"),
        (2, "2"),
        (("0", "GPU-0a1b2c3d-0000-1111-2222-333344445555"), '"device=0,GPU-0a1b2c3d-0000-1111-2222-333344445555"'),
    ],
)
def test_gpus_flag_follows_gpu_devices(devices, flag):
    assert nvidia.gpus_flag(devices) == flag


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (SMOKE_OK, None),
        (["Failed to initialize NVML: Unknown Error", "labfleet-rc=255"], "not usable"),
        (
            [
                'docker: Error response from daemon: could not select device driver "" with capabilities: [[gpu]].',
                "labfleet-rc=125",
            ],
            "dockerd started before NVIDIA's hook was installed, so it has no nvidia GPU driver; restart it "
            "(sudo systemctl restart docker)",
        ),
        ([line for line in SMOKE_OK if not line.startswith("GPU ")], "listed no GPU"),
        ([line.replace("True", "False") for line in SMOKE_OK], "does not see CUDA"),
    ],
)
def test_gpu_check_result(lines, problem):
    found = nvidia.gpu_check_problem(parse_gpu_in_container(lines))
    assert found == problem if problem is None else problem in found


def test_gpu_check_runs_only_when_the_deploy_executes_and_fails_with_the_output(fake_host):
    image = "labfleet/jupyterlab:pytorch-0123456789ab"
    planning = fake_host({}, executing=False)
    assert list(nvidia.check_gpu_in_container._inner(image, "all")) == [] and planning.noops == []
    fake = fake_host({GpuInContainer: parse_gpu_in_container(SMOKE_OK), NvidiaDriver: NvidiaDriver.default()})
    assert list(nvidia.check_gpu_in_container._inner(image, "all")) == []
    assert fake.noops == [f"1 GPU(s) visible in {image}; smoke test passed"]
    fake.facts[GpuInContainer] = parse_gpu_in_container(["Failed to initialize NVML: Unknown Error", "labfleet-rc=255"])
    (command,) = list(nvidia.check_gpu_in_container._inner(image, "all"))
    assert "the GPU is not usable in the lab image" in command and "Failed to initialize NVML" in command


# --- What stops a host before anything changes -----------------------------------------------

FEDORA = {"name": "Fedora", "major": 41, "release_meta": {"ID": "fedora"}}


@pytest.fixture
def problems(planning_hosts, monkeypatch):
    """problems(step, settings, facts) -> what the step stops the host with (nothing planned runs)."""

    def plan(step, s, facts):
        _, use = planning_hosts(pc01=facts)
        use("pc01")
        found = []
        for module in (nvidia, nvidia_driver):
            monkeypatch.setattr(module, "require", lambda name, ok, problem: found.append(problem) if not ok else None)
        step._inner(s)
        return found

    return plan


def test_the_toolkit_stops_on_an_unsupported_distribution_or_a_mixed_apt_file(settings, problems):
    facts = host_facts()
    facts[LinuxDistribution] = FEDORA
    facts[AptSourceEntries] = {
        "files": [{"path": "/etc/apt/sources.list.d/lab.list", "entries": 2, "matching": 1}],
        "present": [],
        "sha256": {},
    }
    (problem,) = problems(nvidia.install_container_toolkit, settings(nvidia_toolkit=True), facts)
    assert problem.startswith(
        "host pc01: Fedora is not Debian or Ubuntu; labfleet installs NVIDIA's toolkit on Debian and Ubuntu; "
        "host pc01: /etc/apt/sources.list.d/lab.list mixes NVIDIA's apt entries with other repositories'"
    )


# --- The toolkit floor and the hold -----------------------------------------------------------

OLD_TOOLKIT = {name: ["1.17.7-1"] for name in nvidia.TOOLKIT_PACKAGES}
URL = "https://nvidia.github.io/libnvidia-container/stable/deb/amd64"


def test_a_toolkit_below_the_floor_is_upgraded_and_checked_after(fake_host):
    fake = fake_host({DebPackages: OLD_TOOLKIT})
    commands = list(nvidia.install_toolkit_packages._inner(nvidia.TOOLKIT_PACKAGES, URL, hold_file=nvidia.PIN_FILE))
    assert "update" in commands[0]
    assert commands[1] == f"rm -f {nvidia.PIN_FILE}"
    assert "install --no-install-recommends --allow-downgrades nvidia-container-toolkit " in commands[2]
    assert "libnvidia-container1" in commands[2]
    assert 'dpkg --compare-versions "$v" ge 1.17.8' in commands[3]
    assert f"the NVIDIA Container Toolkit installed from {URL} is $v, below 1.17.8" in commands[3]
    assert "CVE-2025-23266" in commands[3] and "nvidia_toolkit_apt_mirror" in commands[3]
    fake.facts[DebPackages] = {name: ["1.17.8-1"] for name in nvidia.TOOLKIT_PACKAGES}
    assert list(nvidia.install_toolkit_packages._inner(nvidia.TOOLKIT_PACKAGES, URL)) == []
    pinned = [f"{name}=1.18.0-1" for name in nvidia.TOOLKIT_PACKAGES]
    commands = list(nvidia.install_toolkit_packages._inner(pinned, URL))
    assert len(commands) == 3 and "nvidia-container-toolkit=1.18.0-1" in commands[1]


def test_floor_check_uses_dpkgs_order():
    assert nvidia.toolkit_below_floor(OLD_TOOLKIT) is True
    assert nvidia.toolkit_below_floor({"nvidia-container-toolkit-base": ["1.17.8~rc.1-1"]}) is True
    assert nvidia.toolkit_below_floor({"nvidia-container-toolkit-base": ["1.17.8-1"]}) is False
    assert nvidia.toolkit_below_floor({}) is False  # nothing installed: the install takes the newest


def test_hold_writes_each_installed_version_once(fake_host_in):
    versions = {"nvidia-container-toolkit": "1.17.8-1", "libnvidia-container1": "1.17.8-1", "x": "2.0-1"}
    assert apt.hold_preferences(versions, "why") == (
        "# why\n"
        "Package: libnvidia-container1 nvidia-container-toolkit\nPin: version 1.17.8-1\nPin-Priority: 1001\n\n"
        "Package: x\nPin: version 2.0-1\nPin-Priority: 1001\n"
    )
    installed = {name: ["1.17.8-1"] for name in nvidia.TOOLKIT_PACKAGES}
    text = apt.hold_preferences(dict.fromkeys(nvidia.TOOLKIT_PACKAGES, "1.17.8-1"), nvidia.HOLD_COMMENT)
    fake = fake_host_in(apt, {DebPackages: installed, FileContents: None})
    commands = list(apt.hold_packages._inner(nvidia.TOOLKIT_PACKAGES, nvidia.PIN_FILE, nvidia.HOLD_COMMENT))
    assert len(commands) == 3 and commands[2] == f"chmod 644 {nvidia.PIN_FILE}"
    fake.facts[FileContents] = text.splitlines()
    assert list(apt.hold_packages._inner(nvidia.TOOLKIT_PACKAGES, nvidia.PIN_FILE, nvidia.HOLD_COMMENT)) == []
    entries = {"sha256": {nvidia.PIN_FILE: apt._sha256(text)}}
    assert apt.hold_is_current(nvidia.TOOLKIT_PACKAGES, nvidia.PIN_FILE, nvidia.HOLD_COMMENT, installed, entries)
    assert not apt.hold_is_current(nvidia.TOOLKIT_PACKAGES, nvidia.PIN_FILE, nvidia.HOLD_COMMENT, OLD_TOOLKIT, entries)
    assert apt.hold_is_current(nvidia.TOOLKIT_PACKAGES, nvidia.PIN_FILE, None, {}, {"sha256": {}})


def test_the_version_setting_pins_and_no_version_holds(settings):
    assert nvidia.apt_source(settings(), "amd64").hold is True
    pinned = nvidia.apt_source(settings(nvidia_toolkit_version="1.17.8-1"), "amd64")
    assert pinned.hold is False and pinned.pin_version == "1.17.8-1"


@pytest.mark.parametrize(("installed", "ok"), [("1.17.7-1", False), ("1.17.8~rc.1-1", False), ("1.17.8-1", True)])
def test_the_floor_check_runs_on_dpkgs_order(tmp_path, installed, ok):
    """floor_check_command as the host runs it, against a stand-in dpkg-query and the real dpkg."""
    stand_in = tmp_path / "dpkg-query"
    stand_in.write_text(f"#!/bin/sh\nprintf '%s' {installed}\n")
    stand_in.chmod(0o755)
    command = nvidia.floor_check_command("pc01", URL)
    result = subprocess.run(
        ["sh", "-c", command], capture_output=True, text=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin"}
    )
    assert (result.returncode == 0) is ok
    if not ok:
        assert result.stderr.strip() == (
            f"labfleet: host pc01: the NVIDIA Container Toolkit installed from {URL} is {installed}, below 1.17.8 "
            "(1.17.8 is the first release with the fix for CVE-2025-23266 (a container escape; CVE-2024-0132 was "
            "fixed in 1.16.2)); that repository offers nothing newer: point nvidia_toolkit_apt_mirror at one that "
            "has 1.17.8 or later, then run the deploy again"
        )
