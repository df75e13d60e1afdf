"""deploy.py as a whole on real hosts: files, owners, modes, idempotency, refusal of bad input."""

from __future__ import annotations

import pytest
import yaml

from .harness.certs import self_signed_ca
from .harness.hosts import host_exec
from .harness.runner import assert_converged, assert_no_changes, controller_ca_certificates
from .harness.snapshots import checksum_snapshot

PREFLIGHT = "tests/e2e/deploys/preflight_only.py"
MANAGED = ["/opt/labfleet", "/srv/workspace", "/srv/datasets", "/usr/local/share/ca-certificates/labfleet"]


@pytest.fixture
def data(lab_data) -> dict:
    return {**lab_data, "datasets": {"imagenet": "manual"}}


def _stat(host, path: str) -> tuple[str, str, str]:
    owner, group, mode = host_exec(host, f"stat -c '%U %G %a' {path}").stdout.split()
    return owner, group, mode


def test_three_hosts_converge_and_a_second_run_changes_nothing(make_hosts, pyinfra_run, data):
    hosts = make_hosts(3, engine=True)
    first = pyinfra_run(hosts, data=data)
    assert_converged(first)
    for host in hosts:
        assert first.changed(host), f"{host.name}: the first run changed nothing"

    second = pyinfra_run(hosts, data=data)
    assert_no_changes(second)

    for host in hosts:
        assert _stat(host, "/opt/labfleet/lab") == ("root", "root", "755")
        assert _stat(host, "/opt/labfleet/lab/compose.yaml") == ("root", "root", "644")
        assert _stat(host, "/opt/labfleet/lab/.env") == ("root", "root", "600")
        assert _stat(host, "/opt/labfleet/lab/jupyter_token") == ("lab", "lab", "600")
        assert _stat(host, "/srv/workspace/lab") == ("lab", "lab", "750")
        assert _stat(host, "/srv/datasets") == ("root", "labdata", "2755")
        assert _stat(host, "/srv/datasets/imagenet")[2] == "2755"

        compose = yaml.safe_load(host_exec(host, "cat /opt/labfleet/lab/compose.yaml").stdout)
        assert compose["name"] == "labfleet-lab"
        service = compose["services"]["jupyterlab"]
        assert service["ports"] == ["${JUPYTER_BIND}:${JUPYTER_PORT}:8888"]
        assert "deploy" not in service, f"{host.name}: a GPU reservation on a host without GPUs"

        env = host_exec(host, "cat /opt/labfleet/lab/.env").stdout
        uid, gid = host_exec(host, "id -u lab; id -g lab").stdout.split()
        assert f"NB_UID='{uid}'" in env and f"NB_GID='{gid}'" in env
        assert "JUPYTER_BIND='127.0.0.1'" in env and "JUPYTER_PORT='8888'" in env

        token = host_exec(host, "cat /opt/labfleet/lab/jupyter_token").stdout
        assert len(token) == 64 and int(token, 16) >= 0
        assert token not in first.stdout + first.stderr + second.stdout + second.stderr

    tokens = {host_exec(h, "cat /opt/labfleet/lab/jupyter_token").stdout for h in hosts}
    assert len(tokens) == 3, "hosts share a token"


def test_extra_ca_certificates_are_trusted_by_the_hosts(make_hosts, pyinfra_run, tmp_path):
    cas = [*controller_ca_certificates(), self_signed_ca(tmp_path, "labfleet test CA")]
    (host,) = make_hosts(1)
    first = pyinfra_run([host], deploy=PREFLIGHT, data={"extra_ca_certificates": cas})
    assert_converged(first)
    installed = host_exec(host, "ls /usr/local/share/ca-certificates/labfleet").stdout.split()
    assert len(installed) == len(cas)
    bundle = host_exec(host, "cat /etc/ssl/certs/ca-certificates.crt").stdout
    for path in cas:
        with open(path) as pem:
            body = pem.read().strip().splitlines()[1]
        assert body in bundle, f"{host.name}: {path} is not in the trust bundle"
    assert_no_changes(pyinfra_run([host], deploy=PREFLIGHT, data={"extra_ca_certificates": cas}))

    # A CA dropped from the settings leaves the trust store again.
    third = pyinfra_run([host], deploy=PREFLIGHT, data={"extra_ca_certificates": cas[:-1]})
    assert_converged(third)
    assert len(host_exec(host, "ls /usr/local/share/ca-certificates/labfleet").stdout.split()) == len(cas) - 1
    with open(cas[-1]) as pem:
        dropped = pem.read().strip().splitlines()[1]
    assert dropped not in host_exec(host, "cat /etc/ssl/certs/ca-certificates.crt").stdout


def test_a_token_is_kept_and_a_workspace_file_survives_a_redeploy(make_hosts, pyinfra_run, data):
    (host,) = make_hosts(1, engine=True)
    assert_converged(pyinfra_run([host], data=data))
    token = host_exec(host, "cat /opt/labfleet/lab/jupyter_token").stdout
    host_exec(host, "echo notebook > /srv/workspace/lab/keep.ipynb; chmod 0640 /opt/labfleet/lab/jupyter_token")
    before = checksum_snapshot(host, ["/srv/workspace"])

    again = pyinfra_run([host], data={**data, "jupyter_port": 8890})
    assert_converged(again)
    assert again.status(host, "Keep the Jupyter token of lab") == "success", "the token mode was not mended"
    assert host_exec(host, "cat /opt/labfleet/lab/jupyter_token").stdout == token
    assert _stat(host, "/opt/labfleet/lab/jupyter_token") == ("lab", "lab", "600")
    assert "JUPYTER_PORT='8890'" in host_exec(host, "cat /opt/labfleet/lab/.env").stdout
    assert checksum_snapshot(host, ["/srv/workspace"]) == before


def test_one_bad_setting_on_one_host_leaves_every_host_untouched(make_hosts, pyinfra_run, data):
    hosts = make_hosts(3)
    before = {host.name: checksum_snapshot(host, MANAGED, missing_ok=True) for host in hosts}
    bad = hosts[1].name
    result = pyinfra_run(hosts, data=data, host_data={bad: {"jupyter_bind": "everywhere"}}, expect_fail=True)
    assert result.rc != 0
    output = result.stdout + result.stderr
    assert f"host {bad}: jupyter_bind = 'everywhere' is invalid; expected an IPv4 or IPv6 address" in output
    assert "Traceback" not in output
    assert "Starting operation" not in output
    for host in hosts:
        assert checksum_snapshot(host, MANAGED, missing_ok=True) == before[host.name], f"{host.name} was changed"
        assert host_exec(host, "test -e /opt/labfleet", check=False).returncode != 0


@pytest.mark.parametrize(
    "workspace",
    ["/srv/work space/$HOME #1/{user}", '/srv/it\'s "quoted" $x/{user}'],
    ids=["single-quoted", "double-quoted"],
)
def test_awkward_paths_reach_compose_intact(make_hosts, pyinfra_run, data, workspace):
    """The .env quoting, read back by the real docker compose on the host, not by our own parser."""
    (host,) = make_hosts(1, engine=True)
    assert_converged(pyinfra_run([host], data={**data, "workspace_dir": workspace}))
    expected = workspace.replace("{user}", "lab")
    mounts = host_exec(
        host,
        "docker inspect --format '{{range .Mounts}}{{.Source}}|{{.Destination}}\n{{end}}' labfleet-lab-jupyterlab-1",
    ).stdout
    assert f"{expected}|/workspace" in mounts.splitlines(), mounts
