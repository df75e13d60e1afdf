import runpy
from pathlib import Path
from types import SimpleNamespace

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
