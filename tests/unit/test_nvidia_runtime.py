"""labfleet/nvidia_runtime.py: daemon.json's keys, the CDI spec and its refresh units, dockerd's
restart for the hook and the default runtime switched off, against recorded facts and fake hosts."""

import functools

import pytest
from pyinfra.facts.deb import DebPackages
from test_nvidia import RTX_WORKSTATION, RUNTIME_STATE, host_facts, make_planning_hosts

from labfleet import docker, nvidia, nvidia_runtime
from labfleet.facts.nvidia import GpuHost, NvidiaRuntimeState, parse_gpu_host, parse_nvidia_runtime_state
from labfleet.facts.system import ServiceState


@pytest.fixture
def planning_hosts(monkeypatch):
    """planning_hosts(name=facts, ...) -> (hosts, use), as in test_nvidia.py."""
    return functools.partial(make_planning_hosts, monkeypatch)


@pytest.fixture
def fake_host(fake_host_in):
    """fake_host(facts) -> the FakeHost that nvidia_runtime's operations read."""
    return lambda facts=None, executing=True: fake_host_in(nvidia_runtime, facts, executing)


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
    assert nvidia_runtime.exec_opts_with_cgroupfs(current) == expected


def test_daemon_keys_register_the_runtime_by_merge(settings, planning_hosts):
    _, use = planning_hosts(pc01=host_facts(daemon_json={"exec-opts": ["native.umask=normal"]}))
    use("pc01")
    keys = nvidia_runtime.daemon_keys(settings(nvidia_toolkit=True))
    assert keys == {
        "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}},
        "exec-opts": ["native.umask=normal", "native.cgroupdriver=cgroupfs"],
    }
    assert (
        nvidia_runtime.daemon_keys(settings(nvidia_toolkit=True, nvidia_default_runtime=True))["default-runtime"]
        == "nvidia"
    )
    assert nvidia_runtime.daemon_keys(settings(nvidia_toolkit=False)) == {}


# What `nvidia-ctk runtime configure --runtime=docker` writes into an empty daemon.json: the
# runtime entry and nothing else.
BY_NVIDIA_CTK = {"runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}}}


def test_a_host_configured_by_nvidia_ctk_keeps_its_runtime_and_gains_only_the_cgroupfs_driver(settings, planning_hosts):
    _, use = planning_hosts(pc01=host_facts(daemon_json=BY_NVIDIA_CTK))
    use("pc01")
    s = settings(nvidia_toolkit=True)
    wanted = docker.daemon_config(s, [nvidia_runtime.daemon_keys(s)])
    merged = docker.merged_daemon_json(BY_NVIDIA_CTK, wanted)
    # NVIDIA's entry is labfleet's own, so the merge changes only what nvidia-ctk does not write:
    # one daemon.json write (and one dockerd restart) on the first deploy, none after.
    assert merged == {**BY_NVIDIA_CTK, "exec-opts": ["native.cgroupdriver=cgroupfs"]}
    assert merged["runtimes"] == BY_NVIDIA_CTK["runtimes"]
    assert docker.merged_daemon_json(merged, wanted) == merged


# --- CDI and dockerd --------------------------------------------------------------------------


def test_runtime_state_fact():
    assert parse_nvidia_runtime_state([*RUNTIME_STATE, "refresh-spec", "default-runtime"]) == {
        "spec": True,
        "spec_for": "570.86.15 1.17.8-1",
        "refresh_spec": True,
        "default_runtime": True,
        "hook_changed": 1700000100,
        "service_started": 1700000200,
    }
    assert parse_nvidia_runtime_state(["spec-for "]) == NvidiaRuntimeState.default()


ENABLED = {"systemd": True, "active": "active", "enabled": "enabled"}
NO_UNIT = {"systemd": True, "active": "inactive", "enabled": "not-found"}
# The path unit as the postinst leaves it, and the oneshot service, which stays "active
# (exited)" after a run (RemainAfterExit=yes) and "inactive" when its conditions failed.
DISABLED = {"systemd": True, "active": "inactive", "enabled": "disabled"}


def cdi(driver, toolkit, lines, path_unit=NO_UNIT, service_unit=NO_UNIT):
    return nvidia_runtime.cdi_commands(driver, toolkit, parse_nvidia_runtime_state(lines), path_unit, service_unit)


@pytest.mark.parametrize(
    ("driver", "toolkit", "lines", "current"),
    [
        (None, "1.17.8-1", [], True),  # no driver, nothing to describe
        ("570.86.15", "1.17.8-1", RUNTIME_STATE, True),
        ("580.65.06", "1.17.8-1", RUNTIME_STATE, False),  # the driver changed
        ("570.86.15", "1.17.9-1", RUNTIME_STATE, False),  # the toolkit changed
        ("570.86.15", "1.17.8-1", ["spec", "spec-for 570.86.15"], False),  # made by labfleet before the toolkit
        ("570.86.15", "1.17.8-1", RUNTIME_STATE[1:], False),  # the spec was removed
        ("570.86.15", "1.17.8-1", ["spec"], False),  # a spec labfleet did not generate
    ],
)
def test_cdi_spec_before_1_18_is_regenerated_when_the_driver_or_the_toolkit_changed(driver, toolkit, lines, current):
    commands = cdi(driver, toolkit, lines)
    assert (commands == []) is current
    if not current:
        assert commands[0] == "install -d -m 755 /etc/cdi && nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"
        assert f"echo '{driver} {toolkit}' > /var/lib/labfleet/nvidia/cdi-driver-version.new" in commands[1]


def test_toolkit_1_18_uses_nvidias_refresh_units_and_drops_the_spec_labfleet_wrote():
    # Upgraded from 1.17.8 (labfleet's /etc/cdi spec), the postinst enabled the units and ran the service.
    commands = cdi("570.86.15", "1.18.0-1", [*RUNTIME_STATE, "refresh-spec"], ENABLED, ENABLED)
    assert commands[0] == "rm -f /etc/cdi/nvidia.yaml"
    assert commands[1].startswith("systemctl restart nvidia-cdi-refresh.service && ")
    assert "wrote no /var/run/cdi/nvidia.yaml for driver 570.86.15" in commands[1]
    assert "echo 'refresh 570.86.15 1.18.0-1' > /var/lib/labfleet/nvidia/cdi-driver-version.new" in commands[2]
    converged = ["spec-for refresh 570.86.15 1.18.0-1", "refresh-spec"]
    assert cdi("570.86.15", "1.18.0-1", converged, ENABLED, ENABLED) == []
    # A new driver: NVIDIA's service runs again (it stays "active (exited)", so a start would not).
    assert cdi("580.65.06", "1.18.0-1", converged, ENABLED, ENABLED)[0].startswith(
        "systemctl restart nvidia-cdi-refresh.service"
    )
    # The spec under /var/run is gone (a reboot whose refresh failed): run the service again.
    assert cdi("570.86.15", "1.18.0-1", converged[:1], ENABLED, ENABLED) != []
    # An admin disabled the units: both enabled again, the path unit started; no driver, no spec.
    assert cdi(None, "1.18.0-1", [], DISABLED, DISABLED) == [
        "systemctl enable nvidia-cdi-refresh.path nvidia-cdi-refresh.service",
        "systemctl start nvidia-cdi-refresh.path",
    ]
    # A hand-made /etc/cdi spec (no marker of labfleet's) stays.
    assert cdi(None, "1.18.0-1", ["spec"], ENABLED, DISABLED) == [
        "systemctl enable nvidia-cdi-refresh.path nvidia-cdi-refresh.service"
    ]


def test_a_1_18_toolkit_without_the_units_keeps_labfleets_own_spec():
    assert cdi("570.86.15", "1.18.0-1", ["spec", "spec-for 570.86.15 1.18.0-1"]) == []
    assert nvidia_runtime.uses_cdi_refresh("1.17.8-1", ENABLED) is False
    assert nvidia_runtime.uses_cdi_refresh("1.18.0~rc.1-1", ENABLED) is False
    assert nvidia_runtime.uses_cdi_refresh("1.18.2-1", ENABLED) is True


def test_keep_cdi_spec_current_plans_the_difference(fake_host):
    fake = fake_host(
        {
            GpuHost: parse_gpu_host(RTX_WORKSTATION),
            DebPackages: {name: ["1.17.8-1"] for name in nvidia.TOOLKIT_PACKAGES},
            NvidiaRuntimeState: NvidiaRuntimeState.default(),
            ServiceState: NO_UNIT,
        }
    )
    commands = list(nvidia_runtime.keep_cdi_spec_current._inner())
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in commands[0] and len(commands) == 2
    fake.facts[NvidiaRuntimeState] = parse_nvidia_runtime_state(RUNTIME_STATE)
    assert list(nvidia_runtime.keep_cdi_spec_current._inner()) == []
    assert fake.noops == ["the CDI spec is for driver 570.86.15 and toolkit 1.17.8-1"]


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
    assert nvidia_runtime.dockerd_predates_hook(parse_nvidia_runtime_state(lines)) is predates


# --- The default runtime, switched off -----------------------------------------------------------


def test_default_runtime_goes_only_where_labfleet_set_it(settings, planning_hosts):
    marked = host_facts(daemon_json={"default-runtime": "nvidia"})
    marked[NvidiaRuntimeState] = parse_nvidia_runtime_state([*RUNTIME_STATE, "default-runtime"])
    _, use = planning_hosts(pc01=marked, pc02=host_facts(daemon_json={"default-runtime": "nvidia"}))
    use("pc01")
    off = settings(nvidia_toolkit=True)
    assert nvidia_runtime.daemon_keys_to_drop(off) == {"default-runtime": "nvidia"}
    assert nvidia_runtime.daemon_keys_to_drop(settings(nvidia_toolkit=True, nvidia_default_runtime=True)) == {}
    use("pc02")  # set by hand (nvidia-ctk runtime configure --set-as-default): no marker, it stays
    assert nvidia_runtime.daemon_keys_to_drop(off) == {}
    current = {"default-runtime": "nvidia", "live-restore": True, "log-driver": "local"}
    drop = {"default-runtime": "nvidia"}
    assert docker.merged_daemon_json(current, {"live-restore": True}, drop) == {
        "live-restore": True,
        "log-driver": "local",
    }
    # A value changed by hand, or one docker_daemon asks for, is not labfleet's to remove.
    assert docker.merged_daemon_json({"default-runtime": "runc"}, {}, drop) == {"default-runtime": "runc"}
    assert docker.merged_daemon_json(current, {"default-runtime": "nvidia"}, drop) == current
