"""labfleet/docker.py end to end: the real pyinfra CLI over SSH against systemd test hosts.

Every test runs the deploy twice: the first run converges, the second changes nothing.
Traffic stays on this machine: apt reads the hosts' configured archive, and the docker-ce
source reads a signed repository that a test host serves on its own 127.0.0.1
(tests/e2e/aptrepo.py). Stale entries point at 127.0.0.1:9, where nothing listens.
"""

from __future__ import annotations

import json
import shlex

import pytest

from . import aptrepo
from .harness.hosts import TestHost, host_exec
from .harness.runner import assert_converged, assert_no_changes
from .harness.snapshots import assert_files_preserved, checksum_snapshot

pytestmark = pytest.mark.e2e

DOCKER_STEP = "bench/deploys/docker_step.py"
DEAD_MIRROR = "http://127.0.0.1:9"
# What the test hosts do not need to reach: the controller's CAs are not part of these tests.
BASE = {"extra_ca_certificates": [], "docker_apt_mirror": DEAD_MIRROR}
LOCK_HOLD_S = 20
HOLD_LOCKS = """
import fcntl, sys, time
held = []
for path in ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock", "/var/lib/apt/lists/lock"):
    f = open(path, "a")
    fcntl.lockf(f, fcntl.LOCK_EX)
    held.append(f)
open("/run/fake-upgrade.log", "w").write(f"held {time.time()}\\n")
time.sleep(float(sys.argv[1]))
open("/run/fake-upgrade.log", "a").write(f"released {time.time()}\\n")
"""


def sh(host: TestHost, command: str) -> str:
    return host_exec(host, command, timeout=120).stdout


def write_file(host: TestHost, path: str, text: str) -> None:
    host_exec(host, f"mkdir -p $(dirname {shlex.quote(path)}) && cat > {shlex.quote(path)}", input=text)


def hold_apt_locks(host: TestHost, seconds: int) -> None:
    """Hold the dpkg and apt lists locks from a background unit, as unattended-upgrades does."""
    write_file(host, "/root/hold_locks.py", HOLD_LOCKS)
    sh(host, f"systemd-run --unit fake-unattended-upgrades python3 /root/hold_locks.py {seconds}")
    sh(host, "for i in $(seq 50); do [ -s /run/fake-upgrade.log ] && exit 0; sleep 0.1; done; exit 1")


def docker_compose_version(host: TestHost) -> str:
    return sh(host, "docker compose version --short").strip()


def test_distro_source_on_three_trixie_hosts(make_hosts, pyinfra_run):
    """Three hosts in parallel; one has a hand-set daemon.json key, one stale Docker apt
    files next to unrelated ones, and one is busy with a fake unattended-upgrades."""
    merged, stale, busy = make_hosts(3)
    write_file(merged, "/etc/docker/daemon.json", '{"log-opts": {"max-file": "3"},\n "dns": ["192.0.2.53"]}\n')
    write_file(
        stale,
        "/etc/apt/sources.list.d/docker.list",
        "deb [arch=amd64 signed-by=/usr/share/keyrings/docker-archive-keyring.gpg] "
        f"{DEAD_MIRROR}/debian trixie stable\n",
    )
    write_file(stale, "/usr/share/keyrings/docker-archive-keyring.gpg", "stale key\n")
    write_file(stale, "/etc/apt/sources.list.d/unrelated.list", f"# deb {DEAD_MIRROR}/other trixie main\n")
    write_file(
        stale,
        "/etc/apt/sources.list.d/unrelated.sources",
        f"Enabled: no\nTypes: deb\nURIs: {DEAD_MIRROR}/other\nSuites: trixie\nComponents: main\n",
    )
    unrelated = checksum_snapshot(
        stale, ["/etc/apt/sources.list.d/unrelated.list", "/etc/apt/sources.list.d/unrelated.sources"]
    )
    hold_apt_locks(busy, LOCK_HOLD_S)

    data = {
        **BASE,
        "docker_source": "distro",
        "docker_daemon": {"log-driver": "json-file", "log-opts": {"max-size": "10m"}},
    }
    first = pyinfra_run([merged, stale, busy], deploy=DOCKER_STEP, data=data)
    assert_converged(first)

    for host in (merged, stale, busy):
        assert docker_compose_version(host).startswith("2."), host.name
        assert sh(host, "docker info --format '{{.LoggingDriver}}'").strip() == "json-file", host.name
        assert "docker" in sh(host, "id -nG lab").split(), host.name
        assert first.status(host, "Install Docker Engine packages") == "success", host.name

    config = json.loads(sh(merged, "cat /etc/docker/daemon.json"))
    assert config == {
        "log-opts": {"max-file": "3", "max-size": "10m"},
        "dns": ["192.0.2.53"],
        "log-driver": "json-file",
        "live-restore": True,
    }

    assert (
        sh(
            stale, "ls /etc/apt/sources.list.d/docker.list /usr/share/keyrings/docker-archive-keyring.gpg 2>&1 || true"
        ).count("No such file")
        == 2
    )
    after = checksum_snapshot(
        stale, ["/etc/apt/sources.list.d/unrelated.list", "/etc/apt/sources.list.d/unrelated.sources"]
    )
    assert_files_preserved(unrelated, after, host=stale.name, allow_added=False)

    held, released = (float(line.split()[1]) for line in sh(busy, "cat /run/fake-upgrade.log").splitlines())
    installed_at = int(sh(busy, "stat -c %Y /var/lib/dpkg/info/docker.io.list"))
    assert released - held >= LOCK_HOLD_S - 1
    assert installed_at >= int(released), f"{busy.name}: docker.io was installed while another process held the lock"

    assert_no_changes(pyinfra_run([merged, stale, busy], deploy=DOCKER_STEP, data=data))


def test_bookworm_distro_source_stops_before_changing_anything(make_hosts, pyinfra_run):
    """Debian 12 has only Compose v1; labfleet says what to do and leaves the host alone."""
    (host,) = make_hosts(1, distro="bookworm")
    before = checksum_snapshot(host, ["/etc/apt"])
    data = {**BASE, "docker_source": "distro"}
    for _ in range(2):
        result = pyinfra_run([host], deploy=DOCKER_STEP, data=data, expect_fail=True)
        output = result.stdout + result.stderr
        assert "ships only Compose v1" in output
        assert "docker_source = 'docker-ce'" in output
        assert result.errors() == [(host.name, "Install Docker Engine | Check that Docker can be installed here")]
        if result.json and result.json.get("results"):
            assert result.changed(host) == []
    assert_files_preserved(before, checksum_snapshot(host, ["/etc/apt"]), host=host.name, allow_added=False)
    assert sh(host, "command -v docker || echo none").strip() == "none"


def test_docker_ce_source_from_a_signed_local_repository(make_hosts, pyinfra_run):
    """The docker-ce source against a signed repository of Debian's own engine packages.

    A repository whose served key did not sign it fails at apt-get update, with labfleet's
    message; once it serves the right key, the next run replaces the keyring and converges.
    """
    (host,) = make_hosts(1)
    packages = ["docker.io", "docker-cli", "docker-compose", "docker-buildx", "containerd", "runc"]
    debs = aptrepo.build_signed_repo(host, packages, codename="trixie", served_key="other")
    assert debs >= len(packages)
    mirror = aptrepo.serve(host)
    data = {**BASE, "docker_source": "docker-ce", "docker_apt_mirror": mirror, "docker_packages": packages}

    wrong = pyinfra_run([host], deploy=DOCKER_STEP, data=data, expect_fail=True)
    output = wrong.stdout + wrong.stderr
    assert "labfleet: apt-get update failed" in output
    assert "NO_PUBKEY" in output or "not signed" in output
    assert wrong.errors() == [(host.name, "Install Docker Engine | Install Docker Engine packages")]
    assert sh(host, "command -v dockerd || echo none").strip() == "none"

    aptrepo.serve_key(host, "signing")
    first = pyinfra_run([host], deploy=DOCKER_STEP, data=data)
    assert_converged(first)
    assert first.status(host, "Install Docker's repository key") == "success"
    sources = sh(host, "cat /etc/apt/sources.list.d/docker.sources")
    assert f"URIs: {mirror}/debian" in sources
    assert "Signed-By: /etc/apt/keyrings/docker.asc" in sources
    assert sh(host, "sha256sum < /etc/apt/keyrings/docker.asc") == sh(
        host, f"sha256sum < {aptrepo.REPO_ROOT}/keys/signing.asc"
    )
    assert f"{mirror}/debian trixie/stable" in sh(host, "apt-cache policy docker.io")
    assert docker_compose_version(host).startswith("2.")

    assert_no_changes(pyinfra_run([host], deploy=DOCKER_STEP, data=data))


def test_invalid_daemon_json_stops_the_host_and_is_left_alone(make_hosts, pyinfra_run):
    (host,) = make_hosts(1)
    write_file(host, "/etc/docker/daemon.json", '{"dns": ["192.0.2.53"],}\n')
    before = checksum_snapshot(host, ["/etc/docker", "/etc/apt"])
    data = {**BASE, "docker_source": "distro"}
    for _ in range(2):
        result = pyinfra_run([host], deploy=DOCKER_STEP, data=data, expect_fail=True)
        assert "/etc/docker/daemon.json is not valid JSON" in result.stdout + result.stderr
    assert_files_preserved(
        before, checksum_snapshot(host, ["/etc/docker", "/etc/apt"]), host=host.name, allow_added=False
    )
