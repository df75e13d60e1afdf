"""Secrets stay secret and JupyterLab is safe by default, checked on deployed hosts.

Two hosts are deployed once for the module: `secured` with a jupyter_password_hash, `peer`
with the default token only. Two runs write secrets: the first deploy (normal output) and a
second one with `-vvv` that rotates the hash and makes `peer` generate a new token, so both
verbosities are checked against runs that handled secrets.

The password hash is a syntactically valid argon2id string with random salt and digest
(argon2-cffi is not among the controller's dependencies); nobody knows a password for it,
which is all these tests need: they look for the string, they never log in with it.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
from dataclasses import dataclass

import pytest

from .harness.engine import docker
from .harness.hosts import TestHost, host_exec
from .harness.runner import Result, assert_converged, run_pyinfra
from .probes import api_status

PROJECT = "/opt/labfleet/lab"
FIND_CONTAINER = "docker ps -q --filter label=com.docker.compose.project=labfleet-lab"


def _argon2_hash() -> str:
    salt = base64.b64encode(secrets.token_bytes(16)).decode().rstrip("=")
    digest = base64.b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return f"$argon2id$v=19$m=65536,t=3,p=4${salt}${digest}"


@dataclass
class Deployed:
    secured: TestHost
    peer: TestHost
    runs: list[Result]
    hashes: list[str]
    tokens: list[str]

    @property
    def secrets(self) -> list[str]:
        return self.hashes + self.tokens

    def leaks(self, text: str) -> list[str]:
        """The secrets (first 12 characters, to keep them out of reports) that occur in text."""
        found = []
        for secret in self.secrets:
            # The hash is also checked without its salt and digest prefix, the parts that matter.
            parts = [secret] if not secret.startswith("$argon2") else [secret, secret.rsplit("$", 2)[1]]
            if any(part in text for part in parts):
                found.append(secret[:12] + "...")
        return found


def _token(host: TestHost) -> str:
    return host_exec(host, f"cat {PROJECT}/jupyter_token").stdout.strip()


@pytest.fixture(scope="module")
def deployed(fleet, lab_data) -> Deployed:
    hosts = fleet.start_hosts(2, engine=True)
    try:
        secured, peer = hosts
        data = {**lab_data, "datasets": {"imagenet": "manual"}}
        first_hash, second_hash = _argon2_hash(), _argon2_hash()
        first = run_pyinfra(hosts, data=data, host_data={secured.name: {"jupyter_password_hash": first_hash}})
        assert_converged(first)
        tokens = [_token(secured), _token(peer)]
        host_exec(peer, f"rm {PROJECT}/jupyter_token")
        second = run_pyinfra(
            hosts, data=data, host_data={secured.name: {"jupyter_password_hash": second_hash}}, args=["-vvv"]
        )
        assert_converged(second)
        assert second.status(secured, "Write the Jupyter password hash of lab") == "success"
        assert second.status(peer, "Keep the Jupyter token of lab") == "success"
        tokens.append(_token(peer))
        assert len(set(tokens)) == 3 and all(len(token) == 64 for token in tokens)
        yield Deployed(secured, peer, [first, second], [first_hash, second_hash], tokens)
    finally:
        if os.environ.get("LABFLEET_KEEP_HOSTS") != "1":
            fleet.remove(hosts)


def _container(host: TestHost) -> str:
    container = host_exec(host, FIND_CONTAINER).stdout.strip()
    assert container, f"{host.name}: no running jupyterlab container"
    return container


def test_a_token_made_anew_is_the_one_jupyterlab_accepts(deployed):
    # The peer's token file was deleted before the second run, which made a new one; the old
    # one stays bind-mounted in a container that is not recreated.
    peer = deployed.peer
    _, old, new = deployed.tokens
    assert deployed.runs[1].status(peer, "Bring up JupyterLab of lab") == "success"
    assert api_status(peer, 8888, new) == "200"
    assert api_status(peer, 8888, old) == "403", "the deleted token still opens JupyterLab"


def test_secrets_never_appear_in_pyinfra_output(deployed):
    assert "-vvv" in deployed.runs[1].command
    for run in deployed.runs:
        verbosity = "-vvv" if "-vvv" in run.command else "normal"
        leaks = deployed.leaks(run.stdout + run.stderr)
        assert not leaks, f"secrets in pyinfra's {verbosity} output: {leaks}"


def test_secrets_never_appear_in_docker_inspect_or_image_history(deployed):
    for host in (deployed.secured, deployed.peer):
        container = _container(host)
        tag = host_exec(host, f"grep LABFLEET_IMAGE {PROJECT}/.env | cut -d\\' -f2").stdout.strip()
        inspected = host_exec(host, f"docker inspect {container}").stdout
        assert "JUPYTER_TOKEN_FILE=/run/secrets/jupyter_token" in inspected
        assert not deployed.leaks(inspected), f"{host.name}: secrets in docker inspect of the container"
        image = host_exec(host, f"docker image inspect {tag}; docker history --no-trunc {tag}").stdout
        assert not deployed.leaks(image), f"{host.name}: secrets in the image or its history"
    inspected = host_exec(deployed.secured, f"docker inspect {_container(deployed.secured)}").stdout
    assert "JUPYTER_PASSWORD_HASH_FILE=/run/secrets/jupyter_password_hash" in inspected


def test_secrets_never_appear_in_the_process_list(deployed):
    for host in (deployed.secured, deployed.peer):
        processes = host_exec(host, "ps -eww -o user,pid,args").stdout
        assert "jupyter" in processes, f"{host.name}: JupyterLab is not running:\n{processes}"
        assert not deployed.leaks(processes), f"{host.name}: secrets in the process list"


def test_env_and_secret_files_are_0600(deployed):
    for host, files in (
        (deployed.secured, [".env", "jupyter_token", "jupyter_password_hash"]),
        (deployed.peer, [".env", "jupyter_token"]),
    ):
        for name in files:
            mode = host_exec(host, f"stat -c %a {PROJECT}/{name}").stdout.strip()
            assert mode == "600", f"{host.name}: {PROJECT}/{name} has mode {mode}"
    assert host_exec(deployed.peer, f"test -e {PROJECT}/jupyter_password_hash", check=False).returncode != 0


def _host_address(host: TestHost) -> str:
    return docker("inspect", "--format", "{{.NetworkSettings.IPAddress}}", host.container).stdout.strip()


def _http_code(host: TestHost, url: str) -> str:
    """The HTTP status curl gets from inside host; 000 when nothing answers."""
    return host_exec(host, f"curl -s -o /dev/null --max-time 5 -w '%{{http_code}}' {url}", check=False).stdout.strip()


def test_jupyter_is_bound_to_loopback_and_unreachable_on_other_addresses(deployed):
    secured, peer = deployed.secured, deployed.peer
    address = _host_address(secured)
    listening = host_exec(secured, "ss -Htln 'sport = :8888'").stdout
    assert "127.0.0.1:8888" in listening and "0.0.0.0:8888" not in listening and "*:8888" not in listening

    assert _http_code(secured, "http://127.0.0.1:8888/api") == "200"
    assert _http_code(secured, f"http://{address}:8888/api") == "000", "reachable on the host's own address"
    # The peer reaches the host (sshd answers), but not its JupyterLab.
    host_exec(peer, f"timeout 5 bash -c '</dev/tcp/{address}/22'")
    assert _http_code(peer, f"http://{address}:8888/api") == "000", "reachable from another host"
    # Nor through the port the harness publishes on the controller's loopback for the host's 8888.
    with socket.socket() as probe:
        probe.settimeout(5)
        try:
            probe.connect(("127.0.0.1", secured.app_port))
            probe.sendall(b"GET /api HTTP/1.0\r\n\r\n")
            answer = probe.recv(64)
        except OSError:
            answer = b""
    assert not answer.startswith(b"HTTP/"), "JupyterLab answered through the host's external interface"


def test_the_container_runs_as_the_user_without_new_privileges(deployed):
    host = deployed.secured
    container = _container(host)
    uid = host_exec(host, "id -u lab").stdout.strip()
    assert uid != "0"
    pids = host_exec(host, "pgrep -f '[j]upyter-lab'").stdout.split()
    assert pids, f"{host.name}: no jupyter-lab process"
    for pid in pids:
        owner = host_exec(host, f"ps -o uid= -p {pid}").stdout.strip()
        assert owner == uid, f"{host.name}: jupyter-lab (pid {pid}) runs as uid {owner}, not lab ({uid})"
        status = host_exec(host, f"cat /proc/{pid}/status").stdout
        assert "NoNewPrivs:\t1" in status, f"{host.name}: jupyter-lab (pid {pid}) may gain privileges"
    options = host_exec(host, f"docker inspect --format '{{{{json .HostConfig.SecurityOpt}}}}' {container}").stdout
    assert "no-new-privileges:true" in options
    assert "NoNewPrivs:\t1" in host_exec(host, f"docker exec {container} cat /proc/1/status").stdout


def test_datasets_are_read_only_inside_the_container(deployed):
    host = deployed.secured
    container = _container(host)
    for path in ("/resource/datasets/probe", "/resource/datasets/imagenet/probe"):
        attempt = host_exec(host, f"docker exec -u 0 {container} touch {path}", check=False)
        assert attempt.returncode != 0, f"{host.name}: root could write {path} in the container"
        assert "Read-only file system" in attempt.stderr
    # The workspace, by contrast, is the user's to write.
    ids = host_exec(host, "echo $(id -u lab):$(id -g lab)").stdout.strip()
    host_exec(host, f"docker exec -u {ids} {container} touch /workspace/probe")
