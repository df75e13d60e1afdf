"""Image delivery and bring-up on real hosts: one image id everywhere, healthy, reachable.

The image is the `jupyter` profile (JupyterLab and its extensions, no torch) on the
harness's local Debian base: PyTorch's CPU wheel index is out of reach of these machines,
and the bring-up does not depend on torch.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

from labfleet import archives, progress
from labfleet.image import CONTEXT_DIR

from .harness import wheels
from .harness.checkout import repo_copy
from .harness.engine import docker
from .harness.hosts import host_exec
from .harness.runner import assert_converged, assert_no_changes
from .probes import api_status, env_tag, health, image_id, rx_bytes

MIB = 2**20
ANSI = re.compile(r"\x1b\[[0-9;]*m")
BYTES = r"[0-9.]+ [KMGT]?i?B of [0-9.]+ [KMGT]?i?B \([0-9]+%\), [0-9.]+ [KMGT]?i?B/s"
LAYERS = r"[0-9]+ of [0-9]+ layers done"
STEP = r"step [0-9]+ of [0-9]+ \(.+\)"


def progress_lines(result, host, steps: str, reading: str) -> list[str]:
    """host's progress lines of the steps (a regex alternation) from the run's log.

    Every progress line in the log must be whole: one line, nothing of pyinfra's inside it.
    """
    lines = [line.strip() for line in ANSI.sub("", result.stderr).splitlines() if " so far" in line]
    whole = re.compile(r"^\[[^\]]+\] +[A-Z][a-z]+ \S+: .+, [0-9hms]+ so far$")
    assert all(whole.match(line) for line in lines), f"a broken progress line in:\n{chr(10).join(lines)}"
    pattern = re.compile(rf"^\[{re.escape(host.name)}\] +(?:{steps}) labfleet/\S+: {reading}, [0-9hms]+ so far$")
    return [line for line in lines if pattern.match(line)]


def test_ship_puts_one_image_id_on_every_host_and_a_rerun_moves_nothing(make_hosts, pyinfra_run, lab_data, monkeypatch):
    data = {**lab_data, "image_delivery": "ship"}
    hosts = make_hosts(3, engine=True)
    monkeypatch.setenv(progress.INTERVAL_ENV, "1")
    first = pyinfra_run(hosts, data=data)
    assert_converged(first)
    for host in hosts:
        assert progress_lines(first, host, "Copy|Load", BYTES), f"no progress line of the copy or load on {host.name}"

    tag = env_tag(hosts[0])
    controller_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    for host in hosts:
        assert image_id(host, tag) == controller_id, f"{host.name} runs another image"
        assert health(host) == "healthy"
        token = host_exec(host, "cat /opt/labfleet/lab/jupyter_token").stdout.strip()
        assert api_status(host) == "403"
        assert api_status(host, token=token) == "200"
        assert "JupyterLab of lab: http://127.0.0.1:8888/lab" in first.stderr

    second = pyinfra_run(hosts, data=data, args=("--debug",))
    assert_no_changes(second)
    assert " so far" not in second.stderr, "a no-change run printed progress"
    assert [op["name"] for op in second.ops if "Copy labfleet/" in op["name"]] == [], "the image was copied again"
    for host in hosts:
        # Every step's state is read in one batched command while planning (deploy.py).
        commands = second.stderr.count(f"Running command on {host.name}: ")
        assert commands == 1, f"a no-change run ran {commands} commands on {host.name}, not 1"


def test_a_new_layer_ships_only_the_layers_the_host_lacks(make_hosts, pyinfra_run, lab_data, tmp_path, monkeypatch):
    data = {**lab_data, "image_delivery": "ship"}
    (host,) = make_hosts(1, engine=True)
    assert_converged(pyinfra_run([host], data=data))
    old_tag = env_tag(host)

    repo = repo_copy(tmp_path / "repo")
    (repo / "container" / "scripts" / "new-layer.bin").write_bytes(os.urandom(4 * MIB))
    before = rx_bytes(host)
    monkeypatch.setenv(progress.INTERVAL_ENV, "1")
    upgraded = pyinfra_run([host], data=data, cwd=repo)
    received = rx_bytes(host) - before
    assert_converged(upgraded)
    # The new image is built and saved on this machine, in that run.
    controller = SimpleNamespace(name=progress.CONTROLLER)
    assert progress_lines(upgraded, controller, "Save", BYTES), "no progress line of the save on the controller"

    tag = env_tag(host)
    assert tag != old_tag
    controller_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    assert image_id(host, tag) == controller_id
    assert health(host) == "healthy"
    assert host_exec(host, "ls /var/tmp | grep -c labfleet-", check=False).stdout.strip() == "0", "archive left"
    assert received >= 4 * MIB
    _assert_only_the_lacking_layers_travelled(repo, old_tag, tag, received)
    assert_no_changes(pyinfra_run([host], data=data, cwd=repo))

    # A one-package change in a middle slice of the lock (filelock added to slice 14 of 20):
    # slices 15..20 keep their diff ids but get new chain ids, so the host fills them in from
    # its own engine, and only the changed slice and the small top layers travel.
    bumped_lock = _add_to_lock(repo, "filelock", base_image=data["base_image"])
    assert bumped_lock == 14
    before = rx_bytes(host)
    bumped = pyinfra_run([host], data=data, cwd=repo)
    received = rx_bytes(host) - before
    assert_converged(bumped)
    new_tag = env_tag(host)
    assert new_tag != tag
    new_id = docker("image", "inspect", "--format", "{{.Id}}", new_tag).stdout.strip()
    assert image_id(host, new_tag) == new_id and health(host) == "healthy"
    shipped, held_above = _assert_only_the_lacking_layers_travelled(repo, tag, new_tag, received)
    assert held_above and "-layers-" in shipped.name, "the layers above the bump that the host has were not filled in"
    assert "Load " + new_tag in " ".join(bumped.changed(host))
    assert host_exec(host, "ls /var/tmp | grep -c labfleet-", check=False).stdout.strip() == "0", "archive left"
    assert_no_changes(pyinfra_run([host], data=data, cwd=repo))


def _add_to_lock(repo: Path, package: str, base_image: str) -> int:
    """Add package's entry from the pytorch lock to the copy's jupyter lock and cut its slices
    again, as relock.sh would; return its slot. Its wheel joins the test wheel cache."""
    source = (CONTEXT_DIR / "requirements" / "pytorch-cu128.txt").read_text()
    entry = re.search(rf"^{package}==.*?(?=^\S)", source, re.S | re.M)
    assert entry, f"{package} is not in the pytorch lock"
    requirement = "".join(
        line for line in entry.group(0).splitlines(keepends=True) if not line.lstrip().startswith("#")
    )
    one = repo / "build" / f"{package}.txt"
    one.parent.mkdir(parents=True, exist_ok=True)
    one.write_text(requirement)
    wheels.fill([one], base_image)
    lock = repo / "container" / "requirements" / "jupyter.txt"
    lock.write_text(lock.read_text() + requirement)
    subprocess.run(
        [sys.executable, str(repo / "container" / "layer_locks.py"), str(lock)], check=True, capture_output=True
    )
    slices = sorted((repo / "container" / "requirements" / "jupyter.layers").glob("*.txt"))
    return next(int(path.stem) for path in slices if f"{package}==" in path.read_text())


def _assert_only_the_lacking_layers_travelled(repo: Path, old_tag: str, new_tag: str, received: int):
    """The archive copied for new_tag held exactly the layers whose diff ids old_tag lacks, and
    the host received its size (plus SSH's own bytes). Returns it, and the layers above the first
    lacking one that the host had (what chain ids alone would have sent again)."""
    new_id = docker("image", "inspect", "--format", "{{.Id}}", new_tag).stdout.strip()
    old_layers = set(json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", old_tag).stdout))
    new_layers = json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", new_tag).stdout)
    lacked = {i for i, diff_id in enumerate(new_layers) if diff_id not in old_layers}
    held_above = [i for i in range(min(lacked), len(new_layers)) if i not in lacked]
    whole = archives.archive_path(new_id, repo)
    stem = whole.name.split(".")[0]
    (shipped,) = (
        path for path in whole.parent.glob(f"{stem}-*") if re.search(r"-(above|layers)-[^.]+\.tar\.", path.name)
    )
    manifest, names = _manifest_and_names(shipped)
    assert {i for i, path in enumerate(manifest) if path in names} == lacked, f"{shipped.name}: other layers travelled"
    assert shipped.stat().st_size <= received < shipped.stat().st_size + MIB, f"{received} bytes for {shipped.name}"
    return shipped, held_above


def _manifest_and_names(archive: Path) -> tuple[list[str], set[str]]:
    """A saved archive's layer files in diff-id order (manifest.json), and the files it holds."""
    with archives.open_compressed(archive) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        names, manifest = set(), []
        for member in tar:
            names.add(member.name)
            if member.name == "manifest.json":
                manifest = json.load(tar.extractfile(member))[0]["Layers"]
    return manifest, names
