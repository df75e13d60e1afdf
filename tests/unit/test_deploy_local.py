"""The real pyinfra CLI against @local: planning only, or refusing before any change."""

import getpass
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
# The dry run plans for a real account; root is refused as a jupyter user.
USER = "nobody" if os.geteuid() == 0 else getpass.getuser()


def _pyinfra(tmp_path, *args, data=()):
    settings = [
        f"jupyter_user={USER}",
        f"datasets_root={tmp_path}/datasets",
        f"workspace_dir={tmp_path}/workspace/{{user}}",
        *data,
    ]
    data_args = [arg for item in settings for arg in ("--data", item)]
    return subprocess.run(
        [PYINFRA, *args, "@local", "deploy.py", *data_args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_lists_the_planned_operations(tmp_path):
    result = _pyinfra(tmp_path, "--dry", "--json")
    assert result.returncode == 0, result.stderr
    planned = [op["name"] for op in json.loads(result.stdout)["plan"]]
    # A met requirement is planned only once something before it may change the host.
    assert f"Preflight | Check that account {USER} exists" not in planned
    for expected in (
        f"Lay out the dataset directories | Create the datasets root {tmp_path}/datasets",
        f"Write the JupyterLab compose projects | Create the workspace of {USER}",
        f"Write the JupyterLab compose projects | Keep the Jupyter token of {USER}",
        f"Write the JupyterLab compose projects | Write compose.yaml of {USER}",
        f"Write the JupyterLab compose projects | Write .env of {USER}",
    ):
        assert expected in planned
    assert list(tmp_path.iterdir()) == [], "a dry run created files"


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("jupyter_port=70000", "host @local: jupyter_port = 70000 is invalid; expected an integer port 1-65535"),
        ("jupyter_prot=8890", "host @local: unknown setting jupyter_prot; did you mean jupyter_port?"),
        ("shm_size=lots", "host @local: shm_size = 'lots' is invalid; expected a size like"),
    ],
)
def test_bad_setting_leaves_the_host_untouched(tmp_path, setting, message):
    app_root_existed = Path("/opt/labfleet").exists()
    result = _pyinfra(tmp_path, "-y", data=[setting])
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert message in output
    assert "Traceback" not in output
    assert "Starting operation" not in output
    assert list(tmp_path.iterdir()) == []
    assert Path("/opt/labfleet").exists() == app_root_existed


def test_a_host_without_sudo_is_named_in_one_line(tmp_path):
    # No sudo on the PATH, as on a minimal Debian install: the batched read is the first command.
    empty = tmp_path / "empty-path"
    empty.mkdir()
    result = subprocess.run(
        [PYINFRA, "-y", "@local", "deploy.py", "--data", "_sudo=True", "--data", f"jupyter_user={USER}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": str(empty)},
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "could not read the host's state" in line]
    assert len(lines) == 1, result.stderr
    assert "sudo: not found; sudo is not installed there" in lines[0], lines[0]
    assert "pyinfra error" not in result.stderr, result.stderr
    assert "<class" not in result.stderr and "parts=((" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
