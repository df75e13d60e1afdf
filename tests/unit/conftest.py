import http.server
import json
import runpy
import shutil
import socketserver
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

REPO = Path(__file__).resolve().parents[2]


def defaults() -> dict:
    """group_data/all.py as pyinfra loads it: its module-level names."""
    data = runpy.run_path(str(REPO / "group_data" / "all.py"))
    return {key: value for key, value in data.items() if not key.startswith("__")}


@pytest.fixture
def raw():
    data = defaults()
    data["jupyter_user"] = "alice"
    return data


class FakeHost:
    """Stands in for pyinfra's `host` inside an operation body: canned facts, noops recorded."""

    def __init__(self, facts=None, executing=True):
        self.facts = facts or {}
        self.noops = []
        self.name = "pc01"
        self.print_prefix = "[pc01] "
        self.state = SimpleNamespace(is_executing=executing)

    def get_fact(self, fact, **kwargs):
        return self.facts[fact]

    def noop(self, message):
        self.noops.append(message)


@pytest.fixture
def fake_host_in(monkeypatch):
    """fake_host_in(module, facts, executing=True) puts a FakeHost where module reads `host`."""

    def install(module, facts=None, executing=True):
        fake = FakeHost(facts, executing)
        monkeypatch.setattr(module, "host", fake)
        return fake

    return install


class _EngineApi(http.server.BaseHTTPRequestHandler):
    """Answers like dockerd's API: the canned JSON for a known path, 404 and a message otherwise."""

    answers: ClassVar[dict] = {}

    def do_GET(self):
        body = self.answers.get(self.path)
        status = 200 if body is not None else 404
        payload = json.dumps(body if body is not None else {"message": f"No such object: {self.path}"}) + "\n"
        self.send_response(status)
        self.send_header("Server", "Docker/26.1.5+dfsg1 (linux)")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def address_string(self):
        return "engine"

    def log_message(self, *args):
        pass


@pytest.fixture
def engine_api(tmp_path, monkeypatch):
    """engine_api(answers) -> run(command): a Unix socket that answers as dockerd's API does, at
    facts.DOCKER_SOCKET, and a runner for fact commands that print what curl got from it."""
    if shutil.which("curl") is None:
        pytest.skip("needs curl, which labfleet installs on every host with the engine")
    from labfleet.facts import docker as facts

    path = tmp_path / "docker.sock"
    monkeypatch.setattr(facts, "DOCKER_SOCKET", str(path))
    handler = type("Handler", (_EngineApi,), {})
    server = socketserver.ThreadingUnixStreamServer(str(path), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def answer(answers: dict):
        handler.answers = answers

        def run(command: str) -> list[str]:
            result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60, check=True)
            return result.stdout.splitlines()

        return run

    yield answer
    server.shutdown()
    server.server_close()


@pytest.fixture
def settings(raw):
    """settings(**overrides) -> the Settings of host pc01 with group_data/all.py and alice as jupyter user."""
    from labfleet.settings import build

    def make(**overrides):
        return build("pc01", {**raw, **overrides})

    return make


@pytest.fixture
def planning_host(monkeypatch):
    def install(answers: dict, **kwargs):
        """planning_host(facts) makes a PlanningHost pyinfra's `host` for labfleet.planning."""
        from fakes import PlanningHost

        from labfleet import planning

        fake = PlanningHost(answers, **kwargs)
        monkeypatch.setattr(planning, "host", fake)
        return fake

    return install
