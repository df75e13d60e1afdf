import runpy
from pathlib import Path

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
