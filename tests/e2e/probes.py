"""Small probes of a deployed test host: image ids, container health, the API's answer."""

from __future__ import annotations

import shlex

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


def jupyter_api(host, path: str, method: str = "GET", user: str = "lab") -> str:
    """The answer of the user's Jupyter server REST API at path, with the user's token, from inside the host."""
    return host_exec(
        host,
        f'curl -sf -X {method} -H "Authorization: token $(cat /opt/labfleet/{user}/jupyter_token)" '
        f"http://127.0.0.1:8888/api{path}",
    ).stdout


# Run by the container's python3 (run_cell): starts a kernel, sends it one cell through the
# kernel's websocket (websocket-client is in the image, as a JupyterLab dependency), and prints
# the kernel's id once the kernel reports the state asked for about that cell: "busy" leaves a
# cell running with no client, "idle" a kernel someone used and then forgot, as a closed
# browser tab leaves it (a kernel started by REST alone stays "starting").
_RUN_CELL = r"""
import json, sys, urllib.request, uuid, websocket
code, until = sys.argv[1], sys.argv[2]
token = open("/run/secrets/jupyter_token").read().strip()
auth = {"Authorization": "token " + token, "Content-Type": "application/json"}
request = urllib.request.Request("http://127.0.0.1:8888/api/kernels", data=b"{}", headers=auth, method="POST")
kernel = json.load(urllib.request.urlopen(request, timeout=60))
channel = websocket.create_connection(
    "ws://127.0.0.1:8888/api/kernels/%s/channels?token=%s" % (kernel["id"], token), timeout=60)
msg_id = uuid.uuid4().hex
header = {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
          "version": "5.3", "date": ""}
content = {"code": code, "silent": False, "store_history": True,
           "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
channel.send(json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content,
                         "channel": "shell", "buffers": []}))
while True:
    message = json.loads(channel.recv())
    if (message.get("msg_type") == "status" and message["parent_header"].get("msg_id") == msg_id
            and message["content"]["execution_state"] == until):
        break
channel.close()
print(kernel["id"])
"""


def run_cell(host, container: str, code: str, until: str) -> str:
    """Start a kernel in container, run code in it, return its id once it is ``until`` ("busy" or "idle")."""
    command = f"docker exec -i {container} python3 - {shlex.quote(code)} {shlex.quote(until)}"
    return host_exec(host, command, input=_RUN_CELL).stdout.strip()
