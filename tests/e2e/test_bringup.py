"""Bring-up on real hosts: one failing host stays alone, several users, upgrades that keep data.

The image is the `jupyter` profile on the harness's local Debian base (see conftest's lab_data).
"""

from __future__ import annotations

from .harness.checkout import repo_copy
from .harness.hosts import host_exec
from .harness.runner import assert_converged, assert_no_changes
from .harness.snapshots import checksum_snapshot
from .probes import api_status, env_tag, health, image_id


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
    assert health(hosts[0]) == "healthy"


def test_two_users_on_one_host_get_two_healthy_containers(make_hosts, pyinfra_run, lab_data):
    (host,) = make_hosts(1, engine=True)
    host_exec(host, "useradd --create-home alice")
    data = {**lab_data, "jupyter_users": ["lab", "alice"]}
    assert_converged(pyinfra_run([host], data=data))
    assert health(host, "lab") == "healthy" and health(host, "alice") == "healthy"
    tokens = {
        user: host_exec(host, f"cat /opt/labfleet/{user}/jupyter_token").stdout.strip() for user in ("lab", "alice")
    }
    assert tokens["lab"] != tokens["alice"]
    assert api_status(host, 8888, tokens["lab"]) == "200" and api_status(host, 8889, tokens["alice"]) == "200"
    assert api_status(host, 8889, tokens["lab"]) == "403", "one user's token opens another user's JupyterLab"
    assert host_exec(host, "stat -c %U /srv/workspace/alice").stdout.strip() == "alice"
    assert_no_changes(pyinfra_run([host], data=data))


def test_a_changed_requirement_redeploys_every_host_and_keeps_their_workspaces(
    make_hosts, pyinfra_run, lab_data, tmp_path
):
    hosts = make_hosts(2, engine=True)
    assert_converged(pyinfra_run(hosts, data=lab_data))
    old_tag = env_tag(hosts[0])
    for host in hosts:
        host_exec(
            host, "head -c 1M /dev/urandom > /srv/workspace/lab/model.bin; chown lab: /srv/workspace/lab/model.bin"
        )
    before = {host.name: checksum_snapshot(host, ["/srv/workspace"]) for host in hosts}

    # Drop one requirement (jupytext, a leaf installed without dependencies) from the lock.
    repo = repo_copy(tmp_path / "repo")
    lock = repo / "container" / "requirements" / "jupyter.txt"
    lines = lock.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("jupytext=="))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith((" ", "\t")))
    lock.write_text("".join(lines[:start] + lines[end:]))

    upgraded = pyinfra_run(hosts, data=lab_data, cwd=repo, timeout=1800)
    assert_converged(upgraded)
    new_tag = env_tag(hosts[0])
    assert new_tag != old_tag
    for host in hosts:
        assert env_tag(host) == new_tag
        assert upgraded.status(host, "Bring up JupyterLab of lab") == "success", f"{host.name} kept the old container"
        assert health(host) == "healthy"
        running = host_exec(host, "docker inspect --format '{{.Image}}' labfleet-lab-jupyterlab-1").stdout.strip()
        assert running == image_id(host, new_tag)
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
