"""Planning of the docker step: package lists, apt files, daemon.json merge, against fake facts."""

import shutil

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
            DaemonJson: {"present": True, "config": docker.daemon_config(s), "error": None},
            ServiceState: {"systemd": True, "active": "active", "enabled": "enabled"},
            DockerEngineStatus: {"server": "26.1.5", "compose": "2.26.1"},
            GroupMembers: {"exists": True, "members": ["alice"], "accounts": ["alice"]},
        }
    )
    # A planned operation would need pyinfra's state; none is planned, so none is called.
    assert planned_problems(s, converged) == []
    assert planning.host.meta.ops == 0 and planning.host.reads == [FactBatch]
