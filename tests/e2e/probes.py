"""Small probes of a deployed test host: image ids, container health, the API's answer."""

from __future__ import annotations

from .harness.engine import docker
from .harness.hosts import host_exec


def image_id(host, ref: str) -> str:
    return host_exec(host, f"docker image inspect --format '{{{{.Id}}}}' {ref}").stdout.strip()


def bridge_ip(host) -> str:
    """The host's address on the engine's bridge: how the other test hosts reach it."""
    return docker("inspect", "--format", "{{.NetworkSettings.IPAddress}}", host.container).stdout.strip()


def rx_bytes(host) -> int:
    """Bytes the host's network interface has received so far: what a delivery moved to it."""
    return int(host_exec(host, "cat /sys/class/net/eth0/statistics/rx_bytes").stdout)


def health(host, user: str = "lab") -> str:
    return host_exec(
        host,
        "docker inspect --format '{{.State.Health.Status}}' "
        f"$(docker ps -q --filter label=com.docker.compose.project=labfleet-{user})",
    ).stdout.strip()


def env_tag(host, user: str = "lab") -> str:
    return host_exec(host, f"grep LABFLEET_IMAGE /opt/labfleet/{user}/.env | cut -d\\' -f2").stdout.strip()


def api_status(host, port: int = 8888, token: str | None = None) -> str:
    """HTTP status of /api/status from inside the host, on the published loopback port."""
    header = f"-H 'Authorization: token {token}'" if token else ""
    return host_exec(
        host, f"curl -s -o /dev/null -w '%{{http_code}}' {header} http://127.0.0.1:{port}/api/status", check=False
    ).stdout.strip()
