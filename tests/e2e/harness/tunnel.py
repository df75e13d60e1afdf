"""A service on the controller's loopback, reachable on a test host's own loopback.

Test hosts are containers; the controller's 127.0.0.1 is not theirs. An SSH remote forward
over the host's own test SSH connection (``ssh -N -R 127.0.0.1:P:127.0.0.1:P``) makes
``127.0.0.1:P`` on the host lead to ``127.0.0.1:P`` on the controller, so the traffic stays
on loopback at both ends and inside an SSH session the test opened itself.
"""

from __future__ import annotations

import contextlib
import subprocess
import time

from .hosts import TestHost, host_exec


@contextlib.contextmanager
def forward_to_host(host: TestHost, port: int, probe_path: str = "/"):
    """While the block runs, the host's 127.0.0.1:port is the controller's 127.0.0.1:port.

    + probe_path: an HTTP path the service answers; the block starts once the host gets an answer
    """
    argv = [
        *host.ssh_command().split()[:-1],
        "-N",
        "-o", "ExitOnForwardFailure=yes",
        "-o", "ServerAliveInterval=5",
        "-o", "BatchMode=yes",
        "-R", f"127.0.0.1:{port}:127.0.0.1:{port}",
        host.ssh_command().split()[-1],
    ]  # fmt: skip
    tunnel = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if tunnel.poll() is not None:
                said = tunnel.stderr.read().decode(errors="replace") if tunnel.stderr else ""
                raise AssertionError(f"{host.name}: the SSH forward of port {port} ended: {said}")
            probe = f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{port}{probe_path}"
            if host_exec(host, probe, check=False).stdout.strip() not in ("", "000"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"{host.name}: 127.0.0.1:{port} never answered through the SSH forward")
        yield f"http://127.0.0.1:{port}"
    finally:
        tunnel.terminate()
        try:
            tunnel.wait(timeout=10)
        except subprocess.TimeoutExpired:
            tunnel.kill()
            tunnel.wait()
