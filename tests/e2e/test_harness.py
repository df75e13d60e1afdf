"""The end-to-end harness itself: real hosts, the real pyinfra CLI, and helpers that can fail.

These tests use throwaway deploys from tests/e2e/deploys/ with pyinfra built-ins only, so
that they prove the harness, not the product.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from .harness.engine import CommandFailed, docker
from .harness.hosts import (
    OWNER_LABEL,
    SESSION_LABEL,
    TEST_LABEL,
    TestHost,
    host_exec,
    remove_stale_hosts,
)
from .harness.runner import (
    assert_converged,
    assert_no_changes,
    controller_ca_certificates,
)
from .harness.snapshots import assert_files_preserved, checksum_snapshot, diff_snapshots

pytestmark = pytest.mark.e2e

DEPLOYS = Path(__file__).resolve().parent / "deploys"
FILES_DEPLOY = DEPLOYS / "harness_files.py"
SHELL_DEPLOY = DEPLOYS / "harness_shell.py"
FAIL_DEPLOY = DEPLOYS / "harness_fail.py"
UPLOADED = "/opt/labfleet-harness/motd.txt"


def test_three_hosts_converge_and_a_rerun_changes_nothing(make_hosts, pyinfra_run):
    hosts = make_hosts(3)

    assert [host.distro for host in hosts] == ["trixie"] * 3
    assert all(re.fullmatch(r"lf-[0-9a-f]{6}-\d+", host.name) for host in hosts)
    assert len({host.ssh_port for host in hosts} | {host.app_port for host in hosts}) == 6

    first = pyinfra_run(hosts, deploy=FILES_DEPLOY)
    assert_converged(first)
    for host in hosts:
        assert first.changed(host) == [
            "Create the harness directory",
            "Upload the harness file",
        ], host.name

    second = pyinfra_run(hosts, deploy=FILES_DEPLOY)
    assert_no_changes(second)
    assert second.status(hosts[0], "Upload the harness file") == "no_change"

    local_sha = hashlib.sha256((DEPLOYS / "files" / "motd.txt").read_bytes()).hexdigest()
    for host in hosts:
        snapshot = checksum_snapshot(host, ["/opt/labfleet-harness"])
        assert snapshot == {UPLOADED: (local_sha, "0644", 0, 0)}, host.name


def test_every_host_gets_the_controller_ca_certificates(make_hosts, pyinfra_run):
    (host,) = make_hosts(1)

    result = pyinfra_run([host], deploy=FILES_DEPLOY, host_data={host.name: {"extra": 1}})

    assert_converged(result)
    assert '"extra_ca_certificates"' in result.inventory
    for path in controller_ca_certificates():
        assert path in result.inventory
    assert '"_sudo": true' in result.inventory


def test_assert_no_changes_names_the_operation_and_host(make_hosts, pyinfra_run):
    (host,) = make_hosts(1)

    result = pyinfra_run([host], deploy=SHELL_DEPLOY)

    assert_converged(result)
    with pytest.raises(AssertionError) as failure:
        assert_no_changes(result)
    assert f"Touch the harness stamp on {host.name}" in str(failure.value)


def test_a_failed_run_names_the_host_and_operation(make_hosts, pyinfra_run):
    (host,) = make_hosts(1)

    result = pyinfra_run([host], deploy=FAIL_DEPLOY, expect_fail=True)

    assert result.rc != 0
    with pytest.raises(AssertionError) as failure:
        assert_converged(result)
    assert f"{host.name}: Fail on purpose" in str(failure.value)
    assert "stderr tail" in str(failure.value)


def test_unparseable_output_reports_the_stderr_tail(pyinfra_run, tmp_path):
    unreachable = TestHost("lf-nohost-1", "none", ssh_port=9, app_port=9, distro="trixie")

    with pytest.raises(AssertionError) as failure:
        pyinfra_run([unreachable], deploy=tmp_path / "no_such_deploy.py")

    message = str(failure.value)
    assert "no JSON document" in message
    assert "stderr tail:" in message
    assert "no_such_deploy" in message


def test_host_exec_and_checksum_snapshot_see_changes(make_hosts):
    (host,) = make_hosts(1)
    host_exec(
        host,
        "mkdir -p '/srv/data/with space' && printf one > /srv/data/a.txt"
        " && printf two > '/srv/data/with space/b.txt' && chown 1000:1000 /srv/data/a.txt",
    )

    before = checksum_snapshot(host, ["/srv/data"])
    assert_files_preserved(before, checksum_snapshot(host, ["/srv/data"]), host=host.name)
    assert set(before) == {"/srv/data/a.txt", "/srv/data/with space/b.txt"}
    assert before["/srv/data/a.txt"].uid == 1000
    assert before["/srv/data/a.txt"].sha256 == hashlib.sha256(b"one").hexdigest()

    host_exec(host, "chmod 0600 /srv/data/a.txt && printf new > /srv/data/c.txt")
    after = checksum_snapshot(host, ["/srv/data"])
    diff = diff_snapshots(before, after)
    assert diff.added == ["/srv/data/c.txt"]
    assert list(diff.changed) == ["/srv/data/a.txt"]
    with pytest.raises(AssertionError, match=r"changed: /srv/data/a.txt \(mode 0644 -> 0600\)"):
        assert_files_preserved(before, after, host=host.name)

    failed = host_exec(host, "exit 3", check=False)
    assert failed.returncode == 3
    with pytest.raises(CommandFailed, match=host.name):
        host_exec(host, "exit 3")
    with pytest.raises(CommandFailed, match="no such path"):
        checksum_snapshot(host, ["/srv/nothing-here"])
    assert checksum_snapshot(host, ["/srv/nothing-here"], missing_ok=True) == {}


def test_hosts_reach_the_apt_archive(make_hosts):
    (host,) = make_hosts(1)

    update = host_exec(host, "apt-get update", timeout=300)

    assert "Reading package lists" in update.stdout


def test_a_bookworm_host_boots_and_converges(make_hosts, pyinfra_run):
    (host,) = make_hosts(1, distro="bookworm")

    assert "bookworm" in host_exec(host, ". /etc/os-release && echo $VERSION_CODENAME").stdout
    assert_converged(pyinfra_run([host], deploy=FILES_DEPLOY))
    assert_no_changes(pyinfra_run([host], deploy=FILES_DEPLOY))


def test_leftovers_of_an_interrupted_run_are_removed(fleet, host_image):
    leftover = f"lf-{fleet.session}-leftover"
    docker(
        "create", "--name", leftover,
        "--label", f"{TEST_LABEL}=1",
        "--label", f"{SESSION_LABEL}=gone00",
        "--label", f"{OWNER_LABEL}=999999999-0",
        "--volume", "/var/lib/docker",
        host_image,
    )  # fmt: skip

    removed = remove_stale_hosts(fleet.session)

    assert leftover in removed
    assert docker("inspect", leftover, check=False).returncode != 0
