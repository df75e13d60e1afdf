"""Planning of the docker step: package lists, apt files, daemon.json merge, reload or restart, against fake facts."""

import json
import logging
import os
import shutil
import subprocess

import pytest
from fakes import PlanningHost
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.server import LinuxDistribution

from labfleet import apt, docker, planning, platform
from labfleet.facts.apt import AptSourceEntries
from labfleet.facts.docker import AppArmorEnabled, DaemonJson, DockerEngineStatus, parse_daemon_json
from labfleet.facts.system import GroupMembers, ServiceState
from labfleet.planning import FactBatch


@pytest.fixture
def fake_host(fake_host_in):
    return lambda facts=None, executing=True: fake_host_in(docker, facts, executing)


def D(distro_id, major):
    return platform.Distribution(distro_id, "trixie" if distro_id == "debian" else "noble", major)


def release(distro_id, codename, major, **meta):
    return {
        "name": distro_id.title(),
        "major": major,
        "release_meta": {"ID": distro_id, "VERSION_CODENAME": codename, **meta},
    }


@pytest.mark.parametrize(
    ("fact", "expected"),
    [
        (release("debian", "trixie", 13), platform.Distribution("debian", "trixie", 13)),
        (release("ubuntu", "noble", 24), platform.Distribution("ubuntu", "noble", 24)),
        (
            {
                "name": "Linuxmint",
                "major": 22,
                "release_meta": {"ID": "linuxmint", "ID_LIKE": "ubuntu debian", "UBUNTU_CODENAME": "noble"},
            },
            platform.Distribution("ubuntu", "noble", 22),
        ),
    ],
)
def test_distribution_from_os_release(fact, expected):
    assert platform.distribution(fact) == expected


@pytest.mark.parametrize(
    "fact",
    [
        {"name": "Fedora", "major": 41, "release_meta": {"ID": "fedora"}},
        {"name": "Debian", "major": None, "release_meta": {"ID": "debian"}},
    ],
)
def test_unsupported_distribution(fact):
    with pytest.raises(platform.UnsupportedDistribution):
        platform.distribution(fact)


def test_docker_ce_packages_are_the_same_everywhere(settings):
    s = settings(docker_source="docker-ce")
    expected = ("docker-ce", "docker-ce-cli", "containerd.io", "docker-buildx-plugin", "docker-compose-plugin")
    assert docker.packages_to_install(s, D("debian", 12)) == expected
    assert docker.packages_to_install(s, D("ubuntu", 24)) == expected


def test_distro_packages_per_distribution(settings):
    s = settings(docker_source="distro")
    debian = ("docker.io", "docker-cli", "docker-compose", "docker-buildx")
    assert docker.packages_to_install(s, D("debian", 13)) == debian
    assert docker.packages_to_install(s, D("debian", None)) == debian
    assert docker.packages_to_install(s, D("ubuntu", 24)) == ("docker.io", "docker-compose-v2", "docker-buildx")


def test_bookworm_distro_has_no_compose_v2_unless_listed(settings):
    assert docker.packages_to_install(settings(docker_source="distro"), D("debian", 12)) is None
    custom = settings(docker_source="distro", docker_packages=["docker.io", "my-compose-v2"])
    assert docker.packages_to_install(custom, D("debian", 12)) == ("docker.io", "my-compose-v2")


def test_docker_version_pins_the_engine_packages_only(settings):
    s = settings(docker_version="5:27.3.1-1~debian.13~trixie")
    assert docker.packages_to_install(s, D("debian", 13)) == (
        "docker-ce=5:27.3.1-1~debian.13~trixie",
        "docker-ce-cli=5:27.3.1-1~debian.13~trixie",
        "containerd.io",
        "docker-buildx-plugin",
        "docker-compose-plugin",
    )
    distro = settings(docker_source="distro", docker_version="26.1.5+dfsg1-9")
    assert docker.packages_to_install(distro, D("debian", 13))[:2] == (
        "docker.io=26.1.5+dfsg1-9",
        "docker-cli=26.1.5+dfsg1-9",
    )


def test_an_explicit_version_in_docker_packages_wins(settings):
    s = settings(docker_version="5:27.3.1-1", docker_packages=["docker-ce=5:28.0.0-1", "docker-ce-cli"])
    assert docker.packages_to_install(s, D("debian", 13)) == ("docker-ce=5:28.0.0-1", "docker-ce-cli=5:27.3.1-1")


def test_apparmor_is_added_where_the_kernel_enforces_it(settings):
    assert docker.packages_to_install(settings(), D("debian", 13), apparmor=True)[-1] == "apparmor"


def test_curl_comes_with_the_engine_unless_it_is_there_or_listed(settings):
    # Every later run reads the engine's state through its socket with curl.
    assert docker.packages_to_install(settings(), D("debian", 13), curl=True)[-1] == "curl"
    assert "curl" not in docker.packages_to_install(settings(), D("debian", 13))
    listed = ("docker.io", "my-compose-v2", "curl=8.14.1-2")
    assert docker.packages_to_install(settings(docker_packages=list(listed)), D("debian", 12), curl=True) == listed


def test_conflicts_never_include_a_wanted_package(settings):
    s = settings(docker_source="docker-ce")
    assert "docker.io" in docker.conflicting_packages(s, platform.DOCKER_CE_PACKAGES)
    assert "containerd" not in docker.conflicting_packages(s, ["docker.io", "containerd", "runc"])
    distro = settings(docker_source="distro")
    assert set(docker.conflicting_packages(distro, ["docker.io"])) >= {"docker-ce", "containerd.io", "podman-docker"}


def test_sources_file_is_deb822_with_signed_by(settings):
    s = settings(docker_apt_mirror="http://127.0.0.1:8080/")
    text = apt.sources_text(docker.repository(s), docker.apt_source(s, D("debian", 13), "arm64"))
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [
        "Types: deb",
        "URIs: http://127.0.0.1:8080/debian",
        "Suites: trixie",
        "Components: stable",
        "Architectures: arm64",
        "Signed-By: /etc/apt/keyrings/docker.asc",
    ]


def stale_apt_files(s, entries):
    """(to remove, mixed) for Docker's repository on a trixie host, as the docker step plans them."""
    repo, source = docker.repository(s), docker.apt_source(s, D("debian", 13), "amd64")
    return apt.stale_files(repo, source, entries), apt.mixed_files(repo, source, entries)


def _entries(*files, present=()):
    return {
        "files": [{"path": p, "entries": n, "matching": m} for p, n, m in files],
        "present": list(present),
        "sha256": {},
    }


def test_stale_docker_files_go_and_the_managed_ones_stay(settings):
    entries = _entries(
        ("/etc/apt/sources.list.d/docker.sources", 1, 1),
        ("/etc/apt/sources.list.d/docker.list", 1, 1),
        present=["/etc/apt/keyrings/docker.asc", "/usr/share/keyrings/docker-archive-keyring.gpg"],
    )
    remove, mixed = stale_apt_files(settings(docker_source="docker-ce"), entries)
    assert remove == ["/etc/apt/sources.list.d/docker.list", "/usr/share/keyrings/docker-archive-keyring.gpg"]
    assert mixed == []


def test_the_distro_source_removes_every_docker_file(settings):
    entries = _entries(
        ("/etc/apt/sources.list.d/docker.sources", 1, 1),
        present=[
            "/etc/apt/sources.list.d/docker.sources",
            "/etc/apt/keyrings/docker.asc",
            "/etc/apt/preferences.d/labfleet-docker",
        ],
    )
    remove, _ = stale_apt_files(settings(docker_source="distro"), entries)
    assert remove == [
        "/etc/apt/sources.list.d/docker.sources",
        "/etc/apt/keyrings/docker.asc",
        "/etc/apt/preferences.d/labfleet-docker",
    ]


def test_files_shared_with_other_repositories_are_reported_not_removed(settings):
    entries = _entries(("/etc/apt/sources.list.d/mixed.list", 3, 1), ("/etc/apt/sources.list", 1, 1))
    remove, mixed = stale_apt_files(settings(), entries)
    assert remove == []
    assert mixed == ["/etc/apt/sources.list.d/mixed.list", "/etc/apt/sources.list"]


def test_markers_match_upstream_and_the_mirror(settings):
    markers = docker.repository_markers(settings(docker_apt_mirror="http://apt.lab/docker"))
    assert "download.docker.com/linux/" in markers
    assert "apt.lab/docker/debian/" in markers and "apt.lab/docker/ubuntu/" in markers


def test_daemon_config_merges_steps_under_the_users_keys(settings):
    s = settings(docker_daemon={"log-driver": "local", "runtimes": {"nvidia": {"args": ["--debug"]}}})
    nvidia = {"runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": []}}}
    registry = {"insecure-registries": ["registry.lab:5000"]}
    assert docker.daemon_config(s, [nvidia, registry]) == {
        "runtimes": {"nvidia": {"path": "nvidia-container-runtime", "args": ["--debug"]}},
        "insecure-registries": ["registry.lab:5000"],
        "log-driver": "local",
    }


def test_hand_set_keys_survive_the_merge():
    current = {"dns": ["10.0.0.2"], "log-opts": {"max-file": "5"}, "runtimes": {"kata": {"path": "/usr/bin/kata"}}}
    wanted = {"log-opts": {"max-size": "10m"}, "runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}
    assert docker.merged_daemon_json(current, wanted) == {
        "dns": ["10.0.0.2"],
        "log-opts": {"max-file": "5", "max-size": "10m"},
        "runtimes": {"kata": {"path": "/usr/bin/kata"}, "nvidia": {"path": "nvidia-container-runtime"}},
    }
    assert current["log-opts"] == {"max-file": "5"}, "the merge must not mutate its input"


def test_merge_of_keys_already_there_is_no_change():
    current = {"log-driver": "local", "features": {"buildkit": True}}
    assert docker.merged_daemon_json(current, {"features": {"buildkit": True}}) == current


@pytest.mark.parametrize(
    ("text", "config", "error"),
    [
        ('{\n  "a": 1\n}', {"a": 1}, None),
        ('{"a":1}', {"a": 1}, None),
        ("", {}, None),
        ('{"a": 1,}', None, "invalid JSON"),
        ("[1, 2]", None, "JSON list, not an object"),
    ],
)
def test_parse_daemon_json(text, config, error):
    parsed = parse_daemon_json(text)
    assert parsed["config"] == config
    assert (parsed["error"] is None) if error is None else (error in parsed["error"])


def test_daemon_json_fact_tells_absent_from_invalid():
    fact = DaemonJson()
    assert fact.process(["absent"]) == {"present": False, "config": None, "error": None}
    assert fact.process(["present", "{", '  "dns": ["1.1.1.1"]', "}"])["config"] == {"dns": ["1.1.1.1"]}
    assert "invalid JSON" in fact.process(["present", "{oops"])["error"]


def test_apt_source_entries_fact():
    fact = AptSourceEntries()
    parsed = fact.process(
        [
            "file 1 1 /etc/apt/sources.list.d/docker.list",
            "file 3 1 /etc/apt/sources.list.d/mixed list.sources",
            "present abc123 /etc/apt/keyrings/docker.asc",
        ]
    )
    assert parsed["files"][1] == {"path": "/etc/apt/sources.list.d/mixed list.sources", "entries": 3, "matching": 1}
    assert parsed["present"] == ["/etc/apt/keyrings/docker.asc"]
    assert parsed["sha256"] == {"/etc/apt/keyrings/docker.asc": "abc123"}


def test_engine_and_group_facts():
    ping = ["HTTP/1.1 200 OK", "Api-Version: 1.45", "Server: Docker/26.1.5+dfsg1 (linux)", ""]
    assert DockerEngineStatus().process([*ping, "package 2.26.1-4"]) == {"server": "26.1.5+dfsg1", "compose": "2.26.1"}
    # Docker's own package, and Ubuntu's with an epoch-free +ds suffix; a plugin no package owns.
    assert DockerEngineStatus().process(["package 2.29.1-1~debian.12~bookworm"])["compose"] == "2.29.1"
    assert DockerEngineStatus().process(["package 2.27.0+ds1-0ubuntu1~24.04.1"])["compose"] == "2.27.0"
    assert DockerEngineStatus().process(["package 1:2.20.2-1"])["compose"] == "2.20.2"
    assert DockerEngineStatus().process(["compose v2.30.3"])["compose"] == "2.30.3"
    # No answer on the socket (engine stopped, or no curl yet), no plugin.
    assert DockerEngineStatus().process(["compose "]) == {"server": None, "compose": None}
    members = GroupMembers().process(["group docker:x:996:lab,alice", "account lab"])
    assert members == {"exists": True, "members": ["lab", "alice"], "accounts": ["lab"]}


def test_engine_status_reads_the_version_from_the_socket(engine_api):
    if shutil.which("docker") is None:
        pytest.skip("the fact asks nothing where there is no docker CLI")
    fact = DockerEngineStatus()
    # The stand-in engine sends dockerd's Server header on every answer, /_ping included.
    assert fact.process(engine_api({"/_ping": "OK"})(fact.command()))["server"] == "26.1.5+dfsg1"


def test_fact_batch_gives_each_part_its_own_parser():
    batch = FactBatch()
    command = batch.command(parts=((DaemonJson, {"path": "/etc/docker/daemon.json"}), (DockerEngineStatus, {})))
    assert command.count("&") >= 2, "the parts run in parallel"
    mark = FactBatch.MARK
    daemon, engine = batch.process([mark, "present", '{"a": 1}', mark])
    assert daemon == {"present": True, "config": {"a": 1}, "error": None}
    assert engine == {"server": None, "compose": None}


# --- What stops a host before anything changes -----------------------------------------------


def docker_host(overrides: dict) -> dict:
    """A fresh trixie host as the docker step reads it (no engine yet), with some facts replaced."""
    facts = {
        LinuxDistribution: release("debian", "trixie", 13),
        DebArch: "amd64",
        AppArmorEnabled: False,
        DebPackages: {"curl": ["8.14.1-2"]},
        AptSourceEntries: _entries(),
        DaemonJson: {"present": False, "config": None, "error": None},
        ServiceState: {"systemd": True, "active": None, "enabled": None},
        DockerEngineStatus: {"server": None, "compose": None},
        GroupMembers: {"exists": False, "members": [], "accounts": ["alice"]},
    }
    return {**facts, **overrides}


@pytest.fixture
def planned_problems(monkeypatch):
    """planned_problems(settings, facts) -> the problems the docker step stops the host with."""

    def plan(s, facts):
        monkeypatch.setattr(planning, "host", PlanningHost(facts))
        found = []
        monkeypatch.setattr(docker, "require", lambda name, ok, problem: found.append(problem) if not ok else None)
        docker.ensure_docker_engine._inner(s)
        return found

    return plan


def test_an_unsupported_distribution_stops_the_host(settings, planned_problems):
    fedora = {"name": "Fedora", "major": 41, "release_meta": {"ID": "fedora"}}
    assert planned_problems(settings(), docker_host({LinuxDistribution: fedora})) == [
        "host pc01: Fedora is not Debian or Ubuntu; labfleet installs Docker on Debian 12/13 and Ubuntu 22.04/24.04"
    ]
    no_codename = {"name": "Debian", "major": 13, "release_meta": {"ID": "debian"}}
    (problem,) = planned_problems(settings(), docker_host({LinuxDistribution: no_codename}))
    assert problem.startswith("host pc01: /etc/os-release of this debian host names no VERSION_CODENAME; ")


def test_every_problem_is_named_in_one_message(settings, planned_problems):
    facts = docker_host(
        {
            ServiceState: {"systemd": False, "active": None, "enabled": None},
            DaemonJson: {"present": True, "config": None, "error": "invalid JSON: Expecting value"},
            AptSourceEntries: _entries(("/etc/apt/sources.list.d/mixed.list", 3, 1)),
        }
    )
    (problem,) = planned_problems(settings(docker_users=["bob"]), facts)
    said = problem.split("; ")
    assert "host pc01: systemd is not running here, and labfleet runs dockerd as a systemd service" in said
    assert "host pc01: /etc/docker/daemon.json is not valid JSON (invalid JSON: Expecting value)" in said
    assert "host pc01: /etc/apt/sources.list.d/mixed.list mixes Docker's apt entries with other repositories'" in said
    assert "host pc01: docker_users names 'bob', which has no account on this host" in said
    assert problem.endswith("create it (adduser) or remove it from docker_users")


def test_merge_daemon_json_leaves_an_invalid_file_alone_and_says_why(fake_host):
    fake_host({DaemonJson: {"present": True, "config": None, "error": "invalid JSON: Expecting value"}})
    (command,) = list(docker.merge_daemon_json._inner({"log-driver": "local"}))
    assert "host pc01: /etc/docker/daemon.json is not valid JSON (invalid JSON: Expecting value)" in command
    assert "labfleet left it untouched" in command and command.endswith("exit 1")


def test_a_converged_host_plans_no_operation(settings, planned_problems):
    s = settings(docker_source="distro")
    installed = {name: ["1"] for name in ("docker.io", "docker-cli", "docker-compose", "docker-buildx", "curl")}
    converged = docker_host(
        {
            DebPackages: installed,
            DaemonJson: {"present": True, "config": {**docker.daemon_config(s), "live-restore": True}, "error": None},
            ServiceState: {"systemd": True, "active": "active", "enabled": "enabled"},
            DockerEngineStatus: {"server": "26.1.5", "compose": "2.26.1"},
            GroupMembers: {"exists": True, "members": ["alice"], "accounts": ["alice"]},
        }
    )
    # A planned operation would need pyinfra's state; none is planned, so none is called.
    assert planned_problems(s, converged) == []
    assert planning.host.meta.ops == 0 and planning.host.reads == [FactBatch]


# --- live-restore, and reload instead of restart ----------------------------------------------


def test_live_restore_is_wanted_unless_the_host_sets_it_and_docker_daemon_wins(settings):
    assert docker.live_restore_keys({}) == {"live-restore": True}
    assert docker.live_restore_keys({"live-restore": False}) == {}
    assert docker.live_restore_keys({"live-restore": True}) == {}
    plain = settings()
    assert docker.daemon_config(plain, [docker.live_restore_keys({})])["live-restore"] is True
    assert "live-restore" not in docker.daemon_config(plain, [docker.live_restore_keys({"live-restore": False})])
    opted_out = settings(docker_daemon={"live-restore": False})
    assert docker.daemon_config(opted_out, [docker.live_restore_keys({})])["live-restore"] is False
    forced = settings(docker_daemon={"live-restore": True})
    assert docker.daemon_config(forced, [docker.live_restore_keys({"live-restore": False})])["live-restore"] is True


def test_a_hand_set_false_is_warned_about_unless_docker_daemon_sets_it(settings):
    warning = docker.live_restore_warning(settings(), {"live-restore": False, "dns": ["192.0.2.53"]})
    assert warning == (
        'host pc01: /etc/docker/daemon.json sets "live-restore": false by hand, so every restart of dockerd '
        "(a daemon.json change, an engine upgrade) stops all containers here, running kernels included; "
        "labfleet leaves it as it is; to keep containers running, delete the key there or set docker_daemon = "
        '{"live-restore": true}, then run the deploy again'
    )
    assert docker.live_restore_warning(settings(), {"live-restore": True}) is None
    assert docker.live_restore_warning(settings(), {}) is None
    assert docker.live_restore_warning(settings(docker_daemon={"live-restore": False}), {"live-restore": False}) is None


@pytest.mark.parametrize(
    ("before", "after", "action"),
    [
        ({}, {"live-restore": True}, "reload"),
        ({"live-restore": False}, {"live-restore": True, "labels": ["lab=1"]}, "reload"),
        ({}, {"runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}, "default-runtime": "nvidia"}, "reload"),
        ({}, {"insecure-registries": ["nas.lab:5000"], "registry-mirrors": ["http://127.0.0.1:5000"]}, "reload"),
        ({"debug": False}, {"debug": True, "max-concurrent-downloads": 4, "shutdown-timeout": 30}, "reload"),
        ({}, {"live-restore": True, "log-opts": {"max-size": "10m"}}, "restart"),
        ({"log-opts": {"max-file": "3"}}, {"log-opts": {"max-file": "3", "max-size": "10m"}}, "restart"),
        ({}, {"exec-opts": ["native.cgroupdriver=cgroupfs"], "runtimes": {}}, "restart"),
        ({}, {"features": {"containerd-snapshotter": True}}, "restart"),
        ({"dns": ["192.0.2.53"]}, {"dns": ["192.0.2.53"]}, "none"),
    ],
)
def test_reload_when_every_changed_key_reloads_restart_otherwise(before, after, action):
    assert docker.engine_action(before, after, active=True) == action
    assert docker.engine_action(before, after, active=False) == ("none" if action == "none" else "start")


def test_changed_keys_are_top_level_and_include_removed_ones():
    before = {"log-opts": {"max-file": "3"}, "dns": ["192.0.2.53"], "debug": True}
    after = {"log-opts": {"max-file": "5"}, "dns": ["192.0.2.53"], "labels": ["a=b"]}
    assert docker.changed_keys(before, after) == ["debug", "labels", "log-opts"]
    # debug reloads, but a reload keeps a value the new file no longer sets: removing it restarts.
    assert docker.restart_keys(before, after) == ["debug", "log-opts"]
    assert docker.restart_keys({"default-runtime": "nvidia"}, {}) == ["default-runtime"]


FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$FAKE/calls"
if [ "$1" = reload ] && [ -n "$RELOAD_WORKS" ]; then touch "$FAKE/reloaded"; fi
"""
FAKE_DOCKER = """#!/bin/sh
case "$1" in
  info) if [ -n "$LIVE" ] || [ -e "$FAKE/reloaded" ]; then echo true; else echo false; fi ;;
  events) if [ -e "$FAKE/reloaded" ]; then echo reload; fi ;;
esac
"""
FAKE_DOCKERD = """#!/bin/sh
case "$1" in
  --help) echo "      --validate    Validate daemon configuration and exit" ;;
  --validate) echo "unable to configure the Docker daemon: bad key" >&2; exit "$VALIDATE_RC" ;;
esac
"""


@pytest.fixture
def run_on_fake_host(tmp_path):
    """run(command, **env) -> (rc, stderr, systemctl calls): the command in sh, with stand-ins for
    systemctl, docker, dockerd and chown first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {
        "systemctl": FAKE_SYSTEMCTL,
        "docker": FAKE_DOCKER,
        "dockerd": FAKE_DOCKERD,
        "chown": "#!/bin/sh\n",
    }.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)

    def run(command, **env):
        (tmp_path / "calls").write_text("")
        (tmp_path / "reloaded").unlink(missing_ok=True)
        environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE": str(tmp_path), **env}
        done = subprocess.run(["sh", "-c", command], env=environment, capture_output=True, text=True, timeout=30)
        return done.returncode, done.stderr, (tmp_path / "calls").read_text().splitlines()

    return run


def apply(before, after, active=True):
    return docker.apply_daemon_json_command("pc01", "docker.service", before, after, active, wait_s=0.5)


def test_a_reload_waits_for_dockerds_reload_event(run_on_fake_host):
    command = apply({"live-restore": False}, {"live-restore": True, "labels": ["lab=1"]})
    assert run_on_fake_host(command, RELOAD_WORKS="1") == (0, "", ["reload docker.service"])


def test_a_reload_dockerd_does_not_confirm_fails_the_host_and_says_what_to_do(run_on_fake_host):
    rc, stderr, calls = run_on_fake_host(apply({}, {"live-restore": True}))
    assert rc == 1 and calls == ["reload docker.service"]
    assert stderr.strip() == (
        "labfleet: host pc01: dockerd did not confirm reloading /etc/docker/daemon.json within 0.5 s, so its new "
        "settings may not be in effect; its containers keep running; see journalctl -u docker for why, fix it, "
        "then run systemctl reload docker.service"
    )


def test_a_restart_turns_live_restore_on_by_a_reload_first(run_on_fake_host):
    command = apply({}, {"live-restore": True, "log-opts": {"max-size": "10m"}})
    assert run_on_fake_host(command, RELOAD_WORKS="1") == (0, "", ["reload docker.service", "restart docker.service"])
    # live-restore already on in the running engine: the restart keeps the containers as it is.
    assert run_on_fake_host(command, LIVE="1") == (0, "", ["restart docker.service"])


def test_no_restart_when_live_restore_does_not_come_on(run_on_fake_host):
    rc, stderr, calls = run_on_fake_host(apply({}, {"live-restore": True, "log-opts": {"max-size": "10m"}}))
    assert rc == 1 and calls == ["reload docker.service"], "dockerd was restarted without live-restore"
    assert stderr.strip() == (
        "labfleet: host pc01: dockerd did not turn live-restore on within 0.5 s of a reload, so labfleet did not "
        "restart it (that would stop every container); /etc/docker/daemon.json has the new settings (log-opts need "
        "a restart); see journalctl -u docker for why, then run systemctl restart docker.service yourself when its "
        "containers may stop"
    )


def test_live_restore_off_by_choice_and_a_stopped_engine_are_just_restarted(run_on_fake_host):
    off = apply({"live-restore": False}, {"live-restore": False, "log-opts": {"max-size": "10m"}})
    assert run_on_fake_host(off) == (0, "", ["restart docker.service"])
    stopped = apply({}, {"live-restore": True, "log-opts": {"max-size": "10m"}}, active=False)
    assert run_on_fake_host(stopped) == (0, "", ["restart docker.service"])
    assert apply({"debug": True}, {"debug": True}) is None


def test_the_validated_file_replaces_daemon_json_and_a_rejected_one_does_not(tmp_path, run_on_fake_host):
    path = tmp_path / "daemon.json"
    path.write_text('{"dns": ["192.0.2.53"]}\n')
    staged = tmp_path / "daemon.json.labfleet-new"
    staged.write_text('{"dns": ["192.0.2.53"], "bogus": 1}\n')
    command = docker.validate_and_replace_command("pc01", str(path))
    rc, stderr, _ = run_on_fake_host(command, VALIDATE_RC="1")
    assert rc == 1 and not staged.exists() and json.loads(path.read_text()) == {"dns": ["192.0.2.53"]}
    assert stderr.splitlines()[-1] == (
        f"labfleet: host pc01: dockerd rejects the merged {path} (its reason is above); the running engine and "
        f"{path} are unchanged; fix docker_daemon (or the key set by hand there), then run the deploy again"
    )
    staged.write_text('{"dns": ["192.0.2.53"], "live-restore": true}\n')
    assert run_on_fake_host(command, VALIDATE_RC="0")[0] == 0
    assert json.loads(path.read_text())["live-restore"] is True and not staged.exists()


def test_merge_daemon_json_writes_then_reloads_or_restarts_what_it_finds(fake_host):
    running = {"systemd": True, "active": "active", "enabled": "enabled"}
    fake_host({DaemonJson: {"present": True, "config": {"dns": ["192.0.2.53"]}, "error": None}, ServiceState: running})
    install, upload, replace, reload = list(docker.merge_daemon_json._inner({"live-restore": True}))
    assert install == "install -d -m 755 /etc/docker"
    assert json.loads(upload.src.getvalue()) == {"dns": ["192.0.2.53"], "live-restore": True}
    assert replace.endswith("mv -f /etc/docker/daemon.json.labfleet-new /etc/docker/daemon.json")
    assert "systemctl reload docker.service" in reload and "restart" not in reload
    *_, restart = list(docker.merge_daemon_json._inner({"live-restore": True, "log-driver": "local"}))
    assert restart.endswith("systemctl restart docker.service") and "systemctl reload" in restart
    assert len(list(docker.merge_daemon_json._inner({"dns": ["192.0.2.53"]}))) == 0
    assert len(list(docker.merge_daemon_json._inner({"debug": True}, service=None))) == 3


def test_warn_prints_one_line_while_executing_and_changes_nothing(fake_host, caplog):
    fake = fake_host({})
    with caplog.at_level(logging.WARNING, logger="pyinfra"):
        assert list(docker.warn._inner("host pc01: live-restore is off")) == []
    assert [r.getMessage() for r in caplog.records] == ["[pc01] host pc01: live-restore is off"]
    assert fake.noops == ["warned"]


@pytest.fixture
def planned_ops(monkeypatch):
    """planned_ops(settings, facts) -> [(operation name, current, kwargs)] the docker step plans."""

    def plan(s, facts):
        monkeypatch.setattr(planning, "host", PlanningHost(facts))
        planned = []

        def record(operation, current=False, **kwargs):
            planned.append((operation.__name__, current, kwargs))

        monkeypatch.setattr(planning, "unless_current", record)
        monkeypatch.setattr(planning, "notice", record)
        monkeypatch.setattr(docker, "require", lambda name, ok, problem: None)
        docker.ensure_docker_engine._inner(s)
        return planned

    return plan


def converged_host(daemon_json: dict) -> dict:
    installed = {name: ["1"] for name in ("docker.io", "docker-cli", "docker-compose", "docker-buildx", "curl")}
    return docker_host(
        {
            DebPackages: installed,
            DaemonJson: {"present": True, "config": daemon_json, "error": None},
            ServiceState: {"systemd": True, "active": "active", "enabled": "enabled"},
            DockerEngineStatus: {"server": "26.1.5", "compose": "2.26.1"},
            GroupMembers: {"exists": True, "members": ["alice"], "accounts": ["alice"]},
        }
    )


def daemon_op(planned):
    (op,) = [entry for entry in planned if entry[0] == "merge_daemon_json"]
    return op


def test_the_step_merges_live_restore_and_names_reload_or_restart(settings, planned_ops):
    s = settings(docker_source="distro")
    _, current, kwargs = daemon_op(planned_ops(s, converged_host({"dns": ["192.0.2.53"]})))
    assert not current and kwargs["keys"] == {"live-restore": True} and kwargs["service"] == "docker.service"
    assert kwargs["name"] == "Merge settings into /etc/docker/daemon.json and reload or restart dockerd"
    _, current, _ = daemon_op(planned_ops(s, converged_host({"dns": ["192.0.2.53"], "live-restore": True})))
    assert current, "a second run would write daemon.json again"


def test_a_hand_set_false_stays_and_is_warned_about_on_every_run(settings, planned_ops):
    s = settings(docker_source="distro")
    planned = planned_ops(s, converged_host({"live-restore": False}))
    _, current, kwargs = daemon_op(planned)
    assert current and "live-restore" not in kwargs["keys"]
    (warning,) = [kw for op, _, kw in planned if op == "warn"]
    assert warning["name"] == "Warn that live-restore is off by hand"
    assert warning["message"] == docker.live_restore_warning(s, {"live-restore": False})
    opted_out = settings(docker_source="distro", docker_daemon={"live-restore": False})
    assert not [op for op, _, _ in planned_ops(opted_out, converged_host({"live-restore": False})) if op == "warn"]
