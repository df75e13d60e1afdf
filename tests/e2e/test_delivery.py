"""Image delivery and bring-up on real hosts: one image id everywhere, healthy, reachable.

The image is the `jupyter` profile (JupyterLab and its extensions, no torch) on the
harness's local Debian base: PyTorch's CPU wheel index is out of reach of these machines,
and the bring-up does not depend on torch.
"""

from __future__ import annotations

import pytest

from .harness.engine import docker
from .harness.hosts import host_exec
from .harness.runner import assert_converged, assert_no_changes


@pytest.fixture(scope="module")
def image_data(base_image) -> dict:
    return {
        "docker_source": "distro",
        "image_profile": "jupyter",
        "base_image": base_image("trixie"),
        "gpu": False,
    }


def _image_id(host, ref: str) -> str:
    return host_exec(host, f"docker image inspect --format '{{{{.Id}}}}' {ref}").stdout.strip()


def _health(host, user: str = "lab") -> str:
    return host_exec(
        host,
        "docker inspect --format '{{.State.Health.Status}}' "
        f"$(docker ps -q --filter label=com.docker.compose.project=labfleet-{user})",
    ).stdout.strip()


def _api_status(host, port: int = 8888, token: str | None = None) -> str:
    """HTTP status of /api/status from inside the host, on the published loopback port."""
    header = f"-H 'Authorization: token {token}'" if token else ""
    return host_exec(
        host, f"curl -s -o /dev/null -w '%{{http_code}}' {header} http://127.0.0.1:{port}/api/status", check=False
    ).stdout.strip()


def test_ship_puts_one_image_id_on_every_host_and_a_rerun_moves_nothing(make_hosts, pyinfra_run, image_data):
    data = {**image_data, "image_delivery": "ship"}
    hosts = make_hosts(3)
    first = pyinfra_run(hosts, data=data)
    assert_converged(first)

    tag = host_exec(hosts[0], "grep LABFLEET_IMAGE /opt/labfleet/lab/.env | cut -d\\' -f2").stdout.strip()
    controller_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    for host in hosts:
        assert _image_id(host, tag) == controller_id, f"{host.name} runs another image"
        assert _health(host) == "healthy"
        token = host_exec(host, "cat /opt/labfleet/lab/jupyter_token").stdout.strip()
        assert _api_status(host) == "403"
        assert _api_status(host, token=token) == "200"
        assert "JupyterLab of lab: http://127.0.0.1:8888/lab" in first.stderr

    second = pyinfra_run(hosts, data=data)
    assert_no_changes(second)
    assert [op["name"] for op in second.ops if "Copy labfleet/" in op["name"]] == [], "the image was copied again"


def _bridge_ip(host) -> str:
    return docker("inspect", "--format", "{{.NetworkSettings.IPAddress}}", host.container).stdout.strip()


def test_registry_pushes_once_and_every_host_pulls_the_same_id(make_hosts, pyinfra_run, image_data):
    hosts = make_hosts(3)
    registry_host = hosts[0]
    data = {**image_data, "image_delivery": "registry", "image_registry": f"{_bridge_ip(registry_host)}:5000"}
    groups = {"registry": [registry_host]}
    first = pyinfra_run(hosts, data=data, groups=groups)
    assert_converged(first)
    assert first.status(registry_host, "Push the image to the lab registry") == "success"
    tag = host_exec(hosts[0], "grep LABFLEET_IMAGE /opt/labfleet/lab/.env | cut -d\\' -f2").stdout.strip()
    controller_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    for host in hosts:
        assert _image_id(host, tag) == controller_id, f"{host.name} runs another image"
        assert _health(host) == "healthy"
    for host in hosts[1:]:
        assert first.status(host, "Pull the image from the lab registry") == "success"
        assert "Copy labfleet/" not in " ".join(first.changed(host)), f"{host.name} got a copy, not a pull"

    second = pyinfra_run(hosts, data=data, groups=groups)
    assert_no_changes(second)
