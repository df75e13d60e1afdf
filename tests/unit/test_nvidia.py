"""The NVIDIA step: detection, driver floor and install plan, toolkit source, daemon.json, CDI and the
GPU check, from recorded sysfs, /proc and command output and against fake facts."""

import pytest
from fakes import PlanningHost
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import LinuxDistribution

from labfleet import apt, docker, nvidia, nvidia_driver, planning
from labfleet.facts.apt import AptSourceEntries
from labfleet.facts.docker import AppArmorEnabled, DaemonJson, DockerEngineStatus
from labfleet.facts.nvidia import (
    GpuHost,
    GpuInContainer,
    NvidiaRuntimeState,
    parse_gpu_host,
    parse_gpu_in_container,
    parse_nvidia_runtime_state,
)
from labfleet.facts.nvidia_driver import NvidiaDriver
from labfleet.facts.system import GroupMembers, ServiceState
from labfleet.planning import FactBatch
from labfleet.settings import build

COMPONENTS = ("contrib", "non-free", "non-free-firmware")

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
    assert nvidia_driver.driver_meets(driver, floor) is ok


def test_gpu_setting_overrides_detection(raw, monkeypatch):
    monkeypatch.setattr(nvidia, "host", None)  # no host is asked when the setting decides
    assert nvidia.has_gpu(build("pc01", {**raw, "gpu": True})) is True
    assert nvidia.has_gpu(build("pc01", {**raw, "gpu": False})) is False


# --- Planning against fake facts ----------------------------------------------------------


@pytest.fixture
def fake_host(fake_host_in, monkeypatch):
    """One FakeHost where both NVIDIA modules read `host`."""

    def install(facts=None, executing=True):
        fake = fake_host_in(nvidia, facts, executing)
        monkeypatch.setattr(nvidia_driver, "host", fake)
        return fake

    return install


def test_toolkit_setting_decides_before_detection(settings, monkeypatch):
    monkeypatch.setattr(nvidia, "host", None)
    assert nvidia.wants_toolkit(settings(nvidia_toolkit=True, gpu=False)) is True
    assert nvidia.wants_toolkit(settings(nvidia_toolkit=False, gpu=True)) is False
    assert nvidia.wants_toolkit(settings(nvidia_toolkit="auto", gpu=True)) is True


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
        # The docker step's own facts, which deploy.py reads in the same batch.
        AppArmorEnabled: False,
        DockerEngineStatus: {"server": "26.1.5", "compose": "2.26.1"},
        GroupMembers: {"exists": True, "members": ["alice"], "accounts": ["alice"]},
    }


@pytest.fixture
def planning_hosts(monkeypatch):
    """planning_hosts(name: facts, ...) -> {name: PlanningHost}; use(name) makes that host pyinfra's `host`."""

    def make(**answers):
        hosts = {name: PlanningHost(facts) for name, facts in answers.items()}
        for name, fake in hosts.items():
            fake.name, fake.print_prefix = name, f"[{name}] "

        def use(name):
            monkeypatch.setattr(planning, "host", hosts[name])
            monkeypatch.setattr(nvidia, "host", hosts[name])
            return hosts[name]

        return hosts, use

    return make


def test_every_nvidia_step_reads_one_batch_per_host(settings, planning_hosts):
    """What deploy.py reads ahead answers every NVIDIA decision: one round trip per host."""
    hosts, use = planning_hosts(gpu01=host_facts(), cpu01=host_facts(gpu=CPU_ONLY))
    s = settings()
    for name in hosts:
        use(name)
        planning.read_ahead(nvidia.reads(s), docker.reads(s))
    for name, gpu in (("gpu01", True), ("cpu01", False)):
        use(name)
        assert nvidia.has_gpu(s) is gpu and nvidia.wants_toolkit(s) is gpu and nvidia.has_gpu(s) is gpu
        snapshot = nvidia.snapshot(s)
        assert snapshot.runtime["spec_driver"] == "570.86.15" and snapshot.cdi_refresh["active"] == "active"
        assert ("runtimes" in nvidia.daemon_keys(s)) is gpu
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
    assert nvidia.reads(settings(gpu=False)) == {}
    assert "runtime" in nvidia.reads(settings(gpu=False, nvidia_toolkit=True))
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
    assert apt.stale_files(repo, source, entries) == [
        "/etc/apt/sources.list.d/nvidia-container-toolkit.list",
        nvidia.PIN_FILE,  # no nvidia_toolkit_version any more
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


# --- daemon.json ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (None, ["native.cgroupdriver=cgroupfs"]),
        (["native.umask=normal"], ["native.umask=normal", "native.cgroupdriver=cgroupfs"]),
        (
            ["native.cgroupdriver=systemd", "native.umask=normal"],
            ["native.umask=normal", "native.cgroupdriver=cgroupfs"],
        ),
        (
            ["native.cgroupdriver=cgroupfs", "native.umask=normal"],
            ["native.cgroupdriver=cgroupfs", "native.umask=normal"],
        ),
        ("native.cgroupdriver=systemd", ["native.cgroupdriver=cgroupfs"]),
    ],
)
def test_cgroupfs_driver_keeps_other_exec_opts(current, expected):
    assert nvidia.exec_opts_with_cgroupfs(current) == expected


def test_daemon_keys_register_the_runtime_by_merge(settings, planning_hosts):
    _, use = planning_hosts(pc01=host_facts(daemon_json={"exec-opts": ["native.umask=normal"]}))
    use("pc01")
    keys = nvidia.daemon_keys(settings(nvidia_toolkit=True))
    assert keys == {
        "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}},
        "exec-opts": ["native.umask=normal", "native.cgroupdriver=cgroupfs"],
    }
    assert nvidia.daemon_keys(settings(nvidia_toolkit=True, nvidia_default_runtime=True))["default-runtime"] == "nvidia"
    assert nvidia.daemon_keys(settings(nvidia_toolkit=False)) == {}


# What `nvidia-ctk runtime configure --runtime=docker` writes into an empty daemon.json: the
# runtime entry and nothing else.
BY_NVIDIA_CTK = {"runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}}


def test_a_host_configured_by_nvidia_ctk_keeps_its_runtime_and_gains_only_the_cgroupfs_driver(settings, planning_hosts):
    _, use = planning_hosts(pc01=host_facts(daemon_json=BY_NVIDIA_CTK))
    use("pc01")
    s = settings(nvidia_toolkit=True)
    wanted = docker.daemon_config(s, [nvidia.daemon_keys(s)])
    merged = docker.merged_daemon_json(BY_NVIDIA_CTK, wanted)
    # NVIDIA's entry is labfleet's own, so the merge changes only what nvidia-ctk does not write:
    # one daemon.json write (and one dockerd restart) on the first deploy, none after.
    assert merged == {**BY_NVIDIA_CTK, "exec-opts": ["native.cgroupdriver=cgroupfs"]}
    assert merged["runtimes"] == BY_NVIDIA_CTK["runtimes"]
    assert docker.merged_daemon_json(merged, wanted) == merged


# --- CDI and dockerd --------------------------------------------------------------------------

RUNTIME_STATE = ["spec", "spec-driver 570.86.15", "hook-changed 1700000100", "service-started 1700000200"]


def test_runtime_state_fact():
    assert parse_nvidia_runtime_state(RUNTIME_STATE) == {
        "spec": True,
        "spec_driver": "570.86.15",
        "hook_changed": 1700000100,
        "service_started": 1700000200,
    }
    assert parse_nvidia_runtime_state(["spec-driver "]) == NvidiaRuntimeState.default()


@pytest.mark.parametrize(
    ("driver", "lines", "current"),
    [
        (None, [], True),  # no driver, nothing to describe
        ("570.86.15", RUNTIME_STATE, True),
        ("580.65.06", RUNTIME_STATE, False),  # the driver changed
        ("570.86.15", RUNTIME_STATE[1:], False),  # the spec was removed
        ("570.86.15", ["spec"], False),  # a spec labfleet did not generate
    ],
)
def test_cdi_spec_is_regenerated_only_when_the_driver_changed(driver, lines, current):
    assert nvidia.cdi_spec_is_current(driver, parse_nvidia_runtime_state(lines)) is current


def test_generate_cdi_spec_plans_nvidia_ctk_and_the_marker(fake_host):
    fake = fake_host({GpuHost: parse_gpu_host(RTX_WORKSTATION), NvidiaRuntimeState: NvidiaRuntimeState.default()})
    (command,) = list(nvidia.generate_cdi_spec._inner())
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml && " in command
    assert "echo 570.86.15 > /var/lib/labfleet/nvidia/cdi-driver-version.new" in command
    fake.facts[NvidiaRuntimeState] = parse_nvidia_runtime_state(RUNTIME_STATE)
    assert list(nvidia.generate_cdi_spec._inner()) == []
    assert fake.noops == ["/etc/cdi/nvidia.yaml is for driver 570.86.15"]


@pytest.mark.parametrize(
    ("lines", "predates"),
    [
        (["hook-changed 1700000100", "service-started 1700000050"], True),  # toolkit installed under a running dockerd
        (["hook-changed 1700000100", "service-started 1700000100"], False),
        (["hook-changed 1700000100"], False),  # dockerd not running
        (["service-started 1700000050"], False),  # no toolkit
    ],
)
def test_dockerd_restarts_only_when_it_started_before_the_hook(lines, predates):
    assert nvidia.dockerd_predates_hook(parse_nvidia_runtime_state(lines)) is predates


# --- Driver install ---------------------------------------------------------------------------


DEBIAN_SOURCES = """\
Types: deb
URIs: http://archive.example/debian
Suites: trixie trixie-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: trixie-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Enabled: no
Types: deb-src
URIs: http://archive.example/debian
Suites: trixie
Components: main
"""


def test_non_free_is_added_to_the_distributions_deb822_entries_only():
    suites = ("trixie", "trixie-updates", "trixie-security")
    text = nvidia_driver.add_components(DEBIAN_SOURCES, "/etc/apt/sources.list.d/debian.sources", suites, COMPONENTS)
    assert text.splitlines()[3] == "Components: main non-free-firmware contrib non-free"
    assert text.splitlines()[9] == "Components: main contrib non-free non-free-firmware"
    assert text.split("\n\n")[2] == DEBIAN_SOURCES.split("\n\n")[2]  # a disabled stanza is left alone
    assert nvidia_driver.add_components(text, "/etc/apt/sources.list.d/debian.sources", suites, COMPONENTS) == text


def test_non_free_is_added_to_one_line_entries_with_main():
    text = (
        "# installer\n"
        "deb http://archive.example/debian bookworm main non-free-firmware\n"
        "deb [arch=amd64] http://security.example/debian-security bookworm-security main # security\n"
        "deb http://vendor.example/apt stable main\n"
        "deb http://archive.example/debian bookworm-backports main\n"
    )
    suites = ("bookworm", "bookworm-updates", "bookworm-security")
    lines = nvidia_driver.add_components(text, "/etc/apt/sources.list", suites, COMPONENTS).splitlines()
    assert lines[1] == "deb http://archive.example/debian bookworm main non-free-firmware contrib non-free"
    assert lines[2] == (
        "deb [arch=amd64] http://security.example/debian-security bookworm-security main "
        "contrib non-free non-free-firmware # security"
    )
    assert lines[0] == "# installer" and lines[3:] == text.splitlines()[3:]


def test_enable_apt_components_uploads_only_a_difference(fake_host):
    fake = fake_host({FileContents: DEBIAN_SOURCES.splitlines()})
    path = "/etc/apt/sources.list.d/debian.sources"
    commands = list(nvidia_driver.enable_apt_components._inner(path, ["trixie"], COMPONENTS))
    assert len(commands) == 2 and commands[1] == f"chmod 644 {path}"
    fake.facts[FileContents] = None
    assert list(nvidia_driver.enable_apt_components._inner(path, ["trixie"], COMPONENTS)) == []
    assert fake.noops == [f"{path} does not exist"]


def test_loaded_driver_is_checked_again_after_the_reboot(fake_host):
    fake = fake_host({GpuHost: parse_gpu_host(RTX_WORKSTATION)})
    assert list(nvidia_driver.check_loaded_driver._inner("570", "reboot")) == []
    fake.facts[GpuHost] = parse_gpu_host(FRESH_SERVER)
    (command,) = list(nvidia_driver.check_loaded_driver._inner("570", "the branch is older"))
    assert "the loaded NVIDIA driver is none; the branch is older" in command and command.endswith("exit 1")


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
        (["docker: Error response from daemon: could not select device driver", "labfleet-rc=125"], "not usable"),
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


@pytest.mark.parametrize(
    ("state", "commands"),
    [
        ({"systemd": True, "active": "inactive", "enabled": None}, []),
        ({"systemd": True, "active": "inactive", "enabled": "not-found"}, []),
        ({"systemd": True, "active": "active", "enabled": "enabled"}, []),
        (
            {"systemd": True, "active": "inactive", "enabled": "disabled"},
            ["systemctl enable nvidia-cdi-refresh.path", "systemctl start nvidia-cdi-refresh.path"],
        ),
    ],
)
def test_cdi_refresh_is_enabled_only_where_the_toolkit_ships_it(fake_host_in, state, commands):
    fake_host_in(docker, {ServiceState: state})
    assert list(docker.ensure_service._inner(nvidia.CDI_REFRESH_UNIT, if_present=True)) == commands


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
