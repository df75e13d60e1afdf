"""The entrypoint's small scripts that need no container: secrets into the environment, HOME seeding."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from labfleet.model import REPO_ROOT

SCRIPTS = REPO_ROOT / "container" / "scripts"


def _bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env={"PATH": os.environ["PATH"], **env}, check=False
    )


def test_secrets_are_exported_from_their_files_without_the_trailing_newline(tmp_path):
    (tmp_path / "WANDB_API_KEY").write_text("w-123\n")
    (tmp_path / "HF_TOKEN").write_text("h $x 'q'")
    env = {"LABFLEET_SECRETS": "WANDB_API_KEY HF_TOKEN", "LABFLEET_SECRETS_DIR": str(tmp_path)}
    result = _bash(f"set -euo pipefail; source {SCRIPTS}/export-secrets.sh; env", env)
    assert result.returncode == 0, result.stderr
    assert "WANDB_API_KEY=w-123" in result.stdout.splitlines()
    assert "HF_TOKEN=h $x 'q'" in result.stdout.splitlines()
    assert result.stderr == "", "the entrypoint must not print anything about a secret's value"


def test_a_missing_secret_file_stops_the_entrypoint_with_one_line(tmp_path):
    env = {"LABFLEET_SECRETS": "KAGGLE_KEY", "LABFLEET_SECRETS_DIR": str(tmp_path)}
    result = _bash(f"set -euo pipefail; source {SCRIPTS}/export-secrets.sh; echo started", env)
    assert result.returncode == 1 and "started" not in result.stdout
    assert result.stderr.strip().endswith(
        f"secret KAGGLE_KEY: {tmp_path}/KAGGLE_KEY is missing or unreadable as uid {os.getuid()}; run the deploy again"
    )


def test_home_gets_the_image_defaults_it_lacks_and_keeps_its_own(tmp_path):
    skel, home = tmp_path / "skel", tmp_path / "home"
    (skel / ".config" / "tool").mkdir(parents=True)
    (skel / ".bashrc").write_text("image bashrc\n")
    (skel / ".profile").write_text("image profile\n")
    (skel / ".config" / "tool" / "settings").write_text("image\n")
    skel.chmod(0o755)
    (home / ".config").mkdir(parents=True)
    (home / ".config").chmod(0o700)
    (home / ".bashrc").write_text("mine\n")
    home.chmod(0o700)
    result = _bash(f"{SCRIPTS}/seed-home.sh {skel}", {"HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert (home / ".bashrc").read_text() == "mine\n", "a user's file was replaced"
    assert (home / ".profile").read_text() == "image profile\n"
    assert (home / ".config" / "tool" / "settings").read_text() == "image\n"
    assert oct(home.stat().st_mode & 0o777) == "0o700" and oct((home / ".config").stat().st_mode & 0o777) == "0o700"
    again = _bash(f"{SCRIPTS}/seed-home.sh {skel}", {"HOME": str(home)})
    assert again.returncode == 0 and again.stderr == ""


def test_seeding_a_home_the_user_cannot_write_is_skipped(tmp_path):
    result = _bash(f"{SCRIPTS}/seed-home.sh {tmp_path}", {"HOME": str(Path("/nonexistent-home"))})
    assert result.returncode == 0
