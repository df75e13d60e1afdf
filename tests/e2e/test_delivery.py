"""Image delivery and bring-up on real hosts: one image id everywhere, healthy, reachable.

The image is the `jupyter` profile (JupyterLab and its extensions, no torch) on the
harness's local Debian base: PyTorch's CPU wheel index is out of reach of these machines,
and the bring-up does not depend on torch.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .harness.engine import docker
from .harness.hosts import host_exec
from .harness.runner import assert_converged, assert_no_changes
from .harness.snapshots import checksum_snapshot

REPO = Path(__file__).resolve().parents[2]


def _image_id(host, ref: str) -> str:
    return host_exec(host, f"docker image inspect --format '{{{{.Id}}}}' {ref}").stdout.strip()


def _health(host, user: str = "lab") -> str:
    return host_exec(
        host,
        "docker inspect --format '{{.State.Health.Status}}' "
        f"$(docker ps -q --filter label=com.docker.compose.project=labfleet-{user})",
    ).stdout.strip()


def _tag(host, user: str = "lab") -> str:
    return host_exec(host, f"grep LABFLEET_IMAGE /opt/labfleet/{user}/.env | cut -d\\' -f2").stdout.strip()


def _api_status(host, port: int = 8888, token: str | None = None) -> str:
    """HTTP status of /api/status from inside the host, on the published loopback port."""
    header = f"-H 'Authorization: token {token}'" if token else ""
    return host_exec(
        host, f"curl -s -o /dev/null -w '%{{http_code}}' {header} http://127.0.0.1:{port}/api/status", check=False
    ).stdout.strip()


def test_ship_puts_one_image_id_on_every_host_and_a_rerun_moves_nothing(make_hosts, pyinfra_run, lab_data):
    data = {**lab_data, "image_delivery": "ship"}
    hosts = make_hosts(3, engine=True)
    first = pyinfra_run(hosts, data=data)
    assert_converged(first)

    tag = _tag(hosts[0])
    controller_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    for host in hosts:
        assert _image_id(host, tag) == controller_id, f"{host.name} runs another image"
        assert _health(host) == "healthy"
        token = host_exec(host, "cat /opt/labfleet/lab/jupyter_token").stdout.strip()
        assert _api_status(host) == "403"
        assert _api_status(host, token=token) == "200"
        assert "JupyterLab of lab: http://127.0.0.1:8888/lab" in first.stderr

    second = pyinfra_run(hosts, data=data)
    assert_no_changes(second)
    assert [op["name"] for op in second.ops if "Copy labfleet/" in op["name"]] == [], "the image was copied again"


def _bridge_ip(host) -> str:
    return docker("inspect", "--format", "{{.NetworkSettings.IPAddress}}", host.container).stdout.strip()


def test_registry_pushes_once_and_every_host_pulls_the_same_id(make_hosts, pyinfra_run, lab_data):
    hosts = make_hosts(3, engine=True)
    registry_host = hosts[0]
    data = {**lab_data, "image_delivery": "registry", "image_registry": f"{_bridge_ip(registry_host)}:5000"}
    groups = {"registry": [registry_host]}
    first = pyinfra_run(hosts, data=data, groups=groups)
    assert_converged(first)
    assert first.status(registry_host, "Push the image to the lab registry") == "success"
    tag = _tag(hosts[0])
    controller_id = docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    for host in hosts:
        assert _image_id(host, tag) == controller_id, f"{host.name} runs another image"
        assert _health(host) == "healthy"
    for host in hosts[1:]:
        assert first.status(host, "Pull the image from the lab registry") == "success"
        assert "Copy labfleet/" not in " ".join(first.changed(host)), f"{host.name} got a copy, not a pull"

    second = pyinfra_run(hosts, data=data, groups=groups)
    assert_no_changes(second)


def test_build_gives_every_host_the_same_tag_and_ships_the_base_first(make_hosts, pyinfra_run, lab_data):
    data = {**lab_data, "image_delivery": "build"}
    hosts = make_hosts(3, engine=True)
    first = pyinfra_run(hosts, data=data, timeout=1800)
    assert_converged(first)
    tags = {_tag(host) for host in hosts}
    assert len(tags) == 1, f"hosts disagree on the tag: {tags}"
    (tag,) = tags
    for host in hosts:
        assert first.status(host, f"Build {tag}") == "success", f"{host.name} did not build"
        assert _image_id(host, data["base_image"]).startswith("sha256:"), f"{host.name} lacks the shipped base"
        assert _health(host) == "healthy"
    assert_no_changes(pyinfra_run(hosts, data=data))


def test_port_taken_on_one_host_fails_that_host_alone(make_hosts, pyinfra_run, lab_data):
    hosts = make_hosts(2, engine=True)
    busy = hosts[1]
    host_exec(busy, "setsid python3 -m http.server 8888 --bind 127.0.0.1 >/dev/null 2>&1 < /dev/null &")
    host_exec(
        busy, "for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:8888/ && exit 0; sleep 0.1; done; exit 1"
    )
    result = pyinfra_run(hosts, data=lab_data, expect_fail=True)
    assert result.rc != 0
    assert {host for host, _ in result.errors()} == {busy.name}
    assert "Bring up JupyterLab of lab" in result.errors()[0][1]
    assert "address already in use" in result.stderr
    assert _health(hosts[0]) == "healthy"


def test_two_users_on_one_host_get_two_healthy_containers(make_hosts, pyinfra_run, lab_data):
    (host,) = make_hosts(1, engine=True)
    host_exec(host, "useradd --create-home alice")
    data = {**lab_data, "jupyter_users": ["lab", "alice"]}
    assert_converged(pyinfra_run([host], data=data))
    assert _health(host, "lab") == "healthy" and _health(host, "alice") == "healthy"
    tokens = {
        user: host_exec(host, f"cat /opt/labfleet/{user}/jupyter_token").stdout.strip() for user in ("lab", "alice")
    }
    assert tokens["lab"] != tokens["alice"]
    assert _api_status(host, 8888, tokens["lab"]) == "200" and _api_status(host, 8889, tokens["alice"]) == "200"
    assert _api_status(host, 8889, tokens["lab"]) == "403", "one user's token opens another user's JupyterLab"
    assert host_exec(host, "stat -c %U /srv/workspace/alice").stdout.strip() == "alice"
    assert_no_changes(pyinfra_run([host], data=data))


def _repo_copy(tmp_path: Path) -> Path:
    """This checkout's tracked files, to change the image without touching the checkout."""
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name:
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    return copy


def test_a_changed_requirement_redeploys_every_host_and_keeps_their_workspaces(
    make_hosts, pyinfra_run, lab_data, tmp_path
):
    hosts = make_hosts(2, engine=True)
    assert_converged(pyinfra_run(hosts, data=lab_data))
    old_tag = _tag(hosts[0])
    for host in hosts:
        host_exec(
            host, "head -c 1M /dev/urandom > /srv/workspace/lab/model.bin; chown lab: /srv/workspace/lab/model.bin"
        )
    before = {host.name: checksum_snapshot(host, ["/srv/workspace"]) for host in hosts}

    # Drop one requirement (jupytext, a leaf installed without dependencies) from the lock.
    repo = _repo_copy(tmp_path)
    lock = repo / "container" / "requirements" / "jupyter.txt"
    lines = lock.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("jupytext=="))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith((" ", "\t")))
    lock.write_text("".join(lines[:start] + lines[end:]))

    upgraded = pyinfra_run(hosts, data=lab_data, cwd=repo, timeout=1800)
    assert_converged(upgraded)
    new_tag = _tag(hosts[0])
    assert new_tag != old_tag
    for host in hosts:
        assert _tag(host) == new_tag
        assert upgraded.status(host, "Bring up JupyterLab of lab") == "success", f"{host.name} kept the old container"
        assert _health(host) == "healthy"
        running = host_exec(host, "docker inspect --format '{{.Image}}' labfleet-lab-jupyterlab-1").stdout.strip()
        assert running == _image_id(host, new_tag)
        assert checksum_snapshot(host, ["/srv/workspace"]) == before[host.name], f"{host.name} lost workspace files"


def test_datasets_in_the_container_are_read_only_unless_a_dataset_says_otherwise(make_hosts, pyinfra_run, lab_data):
    (host,) = make_hosts(1, engine=True)
    data = {**lab_data, "datasets": {"imagenet": "manual", "scratch": {"source": "manual", "readonly": False}}}
    assert_converged(pyinfra_run([host], data=data))
    container = "labfleet-lab-jupyterlab-1"

    def write(path: str) -> int:
        return host_exec(host, f"docker exec -u lab {container} touch {path}", check=False).returncode

    assert host_exec(host, f"docker exec {container} printenv DATASET_DIR").stdout.strip() == "/resource/datasets"
    assert write("/resource/datasets/scratch/notes.txt") == 0, "a readonly: False dataset is not writable"
    assert host_exec(host, "stat -c %G /srv/datasets/scratch/notes.txt").stdout.strip() == "labdata"
    assert write("/resource/datasets/imagenet/x") != 0, "a read-only dataset is writable"
    assert write("/resource/datasets/x") != 0, "the datasets root is writable"
    assert_no_changes(pyinfra_run([host], data=data))
