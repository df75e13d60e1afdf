"""status.py on real hosts: one row per host, read-only, drift marked and a non-zero exit."""

from __future__ import annotations

import json

import pytest

from .harness.hosts import host_exec
from .harness.runner import Result, assert_converged, run_pyinfra
from .harness.snapshots import checksum_snapshot

STATUS = "status.py"
MANAGED = ["/opt/labfleet", "/srv", "/etc/docker", "/etc/apt", "/usr/local/share/ca-certificates"]


def run_status(hosts, data: dict, as_json: bool = False, expect_fail: bool = False) -> tuple[Result, dict | list[str]]:
    """Run status.py; returns the run and either the status JSON or the table's lines."""
    with pytest.MonkeyPatch.context() as patch:
        if as_json:
            patch.setenv("LABFLEET_STATUS_FORMAT", "json")
        else:
            patch.delenv("LABFLEET_STATUS_FORMAT", raising=False)
        result = run_pyinfra(hosts, deploy=STATUS, data=data, expect_fail=expect_fail)
    assert "Traceback" not in result.stderr, result.stderr_tail()
    if as_json:
        document, _ = json.JSONDecoder().raw_decode(result.stdout.lstrip())
        return result, document
    # The table comes first on stdout; pyinfra's own --json document (on success) follows.
    lines = []
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            break
        lines.append(line)
    return result, lines


def table_rows(lines: list[str]) -> dict[str, str]:
    """host name -> its table line (drift mark included)."""
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break  # the GPU section follows the hosts after a blank line
        if line.startswith("labfleet status:"):
            continue
        if line.startswith(("! ", "note:")) and ":" in line.split()[1 if line.startswith("! ") else 0]:
            continue
        words = line.split()
        if words:
            rows[words[1] if words[0] == "!" else words[0]] = line
    return rows


def _tag(host) -> str:
    return host_exec(host, "grep LABFLEET_IMAGE /opt/labfleet/lab/.env | cut -d\\' -f2").stdout.strip()


def _engine_state(host) -> str:
    containers = "docker inspect --format '{{.Id}} {{.Image}} {{.State.StartedAt}} {{.RestartCount}}' $(docker ps -aq)"
    return host_exec(host, f"{containers}; docker images -q --no-trunc").stdout


@pytest.fixture
def data(lab_data) -> dict:
    return {**lab_data, "datasets": {"imagenet": "manual"}}


def test_status_reports_a_fleet_read_only_and_marks_the_hosts_that_drift(make_hosts, pyinfra_run, data):
    hosts = make_hosts(3, engine=True)
    assert_converged(pyinfra_run(hosts, data=data))
    before = {host.name: (checksum_snapshot(host, MANAGED, missing_ok=True), _engine_state(host)) for host in hosts}

    # A fleet just deployed: every row fine, exit 0, and the run planned no operation.
    result, lines = run_status(hosts, data)
    assert result.rc == 0, result.stderr_tail()
    assert result.json["results"]["operations"] == [], "status planned operations"
    rows = table_rows(lines)
    assert lines[-1] == "labfleet status: all 3 hosts match the fleet and their settings", lines
    assert set(rows) == {host.name for host in hosts}, lines
    for host in hosts:
        line = rows[host.name]
        assert not line.startswith("!"), f"{host.name} marked on a fresh fleet:\n" + "\n".join(lines)
        assert "Debian 13" in line and "lab:healthy http://127.0.0.1:8888/lab" in line
        assert "imagenet:present" in line
    assert not [line for line in lines if line.startswith("! ")]

    result, status = run_status(hosts, data, as_json=True)
    assert result.rc == 0 and status["ok"] is True and status["drift"] == {}
    docker_versions = {entry["docker"] for entry in status["hosts"]}
    assert len(docker_versions) == 1 and None not in docker_versions
    for entry in status["hosts"]:
        assert entry["image_matches"] is True and entry["image"].startswith("sha256:")
        assert entry["expected_image"] == _tag(hosts[0])
        assert entry["gpus"] == 0 and entry["toolkit"] is None
        assert entry["datasets"] == {"imagenet": "present"}
        assert entry["free_datasets"] > 0 and entry["free_docker"] > 0
        (jupyter,) = entry["users"]
        assert jupyter["health"] == "healthy" and jupyter["current"] and jupyter["config_current"]
        assert jupyter["url"] == "http://127.0.0.1:8888/lab"

    for host in hosts:
        after = (checksum_snapshot(host, MANAGED, missing_ok=True), _engine_state(host))
        assert after == before[host.name], f"status changed {host.name}"

    # Drift on purpose: one host loses its container, another gets another image under the tag.
    lost, retagged = hosts[1], hosts[2]
    tag = _tag(hosts[0])
    host_exec(lost, "docker rm -f $(docker ps -aq --filter label=com.docker.compose.project=labfleet-lab)")
    host_exec(
        retagged,
        f"printf 'FROM {tag}\\nLABEL org.labfleet.test.drift=1\\n' | DOCKER_BUILDKIT=0 docker build -q -t {tag} -",
    )

    result, lines = run_status(hosts, data, expect_fail=True)
    assert result.rc != 0
    # The verdict is the table's last line; a drift is an exit status, not a pyinfra error or a traceback.
    assert lines[-1] == f"labfleet status: drift on 2 of 3 hosts: {lost.name}, {retagged.name}", lines
    assert "pyinfra error" not in result.stderr and "report.py" not in result.stderr, result.stderr_tail()
    rows = table_rows(lines)
    assert not rows[hosts[0].name].startswith("!")
    assert rows[lost.name].startswith("!") and "lab:absent" in rows[lost.name]
    assert rows[retagged.name].startswith("!") and "(differs)" in rows[retagged.name]
    assert f"! {lost.name}: lab: container absent" in lines

    result, status = run_status(hosts, data, as_json=True, expect_fail=True)
    assert result.rc != 0 and status["ok"] is False
    assert set(status["drift"]) == {lost.name, retagged.name}
    assert status["drift"][lost.name] == ["lab: container absent"]
    why = " ".join(status["drift"][retagged.name])
    assert "is not the fleet's" in why and "container runs" in why
    by_host = {entry["host"]: entry for entry in status["hosts"]}
    assert by_host[retagged.name]["image_matches"] is False
    assert by_host[hosts[0].name]["ok"] is True

    # The next deploy repairs both, and the status says so.
    assert_converged(pyinfra_run(hosts, data=data))
    result, status = run_status(hosts, data, as_json=True)
    assert result.rc == 0 and status["ok"] is True, status["drift"]
