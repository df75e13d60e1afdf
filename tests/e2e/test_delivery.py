"""Image delivery and bring-up on real hosts: one image id everywhere, healthy, reachable.

The image is the `jupyter` profile (JupyterLab and its extensions, no torch) on the
harness's local Debian base: PyTorch's CPU wheel index is out of reach of these machines,
and the bring-up does not depend on torch.
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

from labfleet import archives, progress

from .harness.checkout import repo_copy
from .harness.engine import docker
from .harness.hosts import host_exec
from .harness.runner import assert_converged, assert_no_changes
from .probes import api_status, bridge_ip, env_tag, health, image_id, rx_bytes

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
    whole = archives.archive_path(controller_id, repo).stat().st_size
    assert 4 * MIB <= received < 4 * MIB + whole // 10, f"{received} bytes moved for a 4 MiB layer ({whole} in all)"
    assert_no_changes(pyinfra_run([host], data=data, cwd=repo))


def test_registry_pushes_once_and_every_host_pulls_the_same_id(make_hosts, pyinfra_run, lab_data, monkeypatch):
    hosts = make_hosts(3, engine=True)
    registry_host = hosts[0]
    data = {**lab_data, "image_delivery": "registry", "image_registry": f"{bridge_ip(registry_host)}:5000"}
    groups = {"registry": [registry_host]}
    monkeypatch.setenv(progress.INTERVAL_ENV, "1")
    first = pyinfra_run(hosts, data=data, groups=groups)
    assert_converged(first)
    for host in hosts[1:]:
        assert progress_lines(first, host, "Pull", LAYERS), f"no progress line of the pull on {host.name}"
    assert first.status(registry_host, "Push the image to the lab registry") == "success"
    tag = env_tag(hosts[0])
    controller_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    for host in hosts:
        assert image_id(host, tag) == controller_id, f"{host.name} runs another image"
        assert health(host) == "healthy"
    for host in hosts[1:]:
        assert first.status(host, "Pull the image from the lab registry") == "success"
        assert "Copy labfleet/" not in " ".join(first.changed(host)), f"{host.name} got a copy, not a pull"

    second = pyinfra_run(hosts, data=data, groups=groups)
    assert_no_changes(second)
    assert " so far" not in second.stderr, "a no-change run printed progress"


def test_build_gives_every_host_the_same_tag_and_ships_the_base_first(make_hosts, pyinfra_run, lab_data, monkeypatch):
    data = {**lab_data, "image_delivery": "build"}
    hosts = make_hosts(3, engine=True)
    monkeypatch.setenv(progress.INTERVAL_ENV, "1")
    first = pyinfra_run(hosts, data=data, timeout=1800)
    assert_converged(first)
    for host in hosts:
        assert progress_lines(first, host, "Build", STEP), f"no progress line of the build on {host.name}"
    tags = {env_tag(host) for host in hosts}
    assert len(tags) == 1, f"hosts disagree on the tag: {tags}"
    (tag,) = tags
    for host in hosts:
        assert first.status(host, f"Build {tag}") == "success", f"{host.name} did not build"
        assert image_id(host, data["base_image"]).startswith("sha256:"), f"{host.name} lacks the shipped base"
        assert health(host) == "healthy"
    second = pyinfra_run(hosts, data=data)
    assert_no_changes(second)
    assert " so far" not in second.stderr, "a no-change run printed progress"
