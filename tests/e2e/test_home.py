"""The persistent home and per-user secrets on a real host with a real Jupyter server.

One host carries the whole story, so CI pays for one bring-up:

1. a deploy with jupyter_env and a secret (the server's and a kernel's environment have it);
2. the layout from before home_dir: the container is recreated by hand from a compose.yaml
   without the HOME mount and with another config label, which is what a container of the
   earlier labfleet was (HOME in its own layer, a digest the current settings do not give);
   files are written into that layer's HOME;
3. the deploy that brings the persistent home: it copies the layer's HOME into home_dir
   (without replacing a file home_dir already has) before it recreates the container;
4. a file in HOME and a JupyterLab setting written through the settings API, then a rotated
   secret under `pyinfra -vvv`: only the secret's file and the container change, the new value
   reaches the server and a new kernel, and HOME, the setting and the copied files survive;
5. the secret values never show in `docker inspect`, `ps`, the container's logs or pyinfra's
   output, and every deploy is followed by a run that changes nothing;
6. a secret taken out of the settings leaves the host and the server;
7. the status reports the home's size.
"""

from __future__ import annotations

import json
import secrets
import shlex

import pytest
import yaml

from .harness.hosts import host_exec
from .harness.runner import assert_converged, assert_no_changes
from .probes import health

PROJECT = "/opt/labfleet/lab"
CONTAINER = "labfleet-lab-jupyterlab-1"
HOME = "/srv/home/lab"
THEMES = "@jupyterlab/apputils-extension:themes"


def _token(host) -> str:
    return host_exec(host, f"cat {PROJECT}/jupyter_token").stdout.strip()


def _api(host, method: str, path: str, body: dict | None = None) -> str:
    """The Jupyter server's answer (status line last) to one request made on the host's loopback port."""
    data = f"-H 'Content-Type: application/json' --data {shlex.quote(json.dumps(body))}" if body is not None else ""
    return host_exec(
        host,
        f"curl -s -X {method} -w '\\n%{{http_code}}' -H 'Authorization: token {_token(host)}' {data} "
        f"http://127.0.0.1:8888{path}",
    ).stdout


def _environ(host, pattern: str, name: str) -> str | None:
    """NAME's value in the environment of the container's process whose command line holds pattern
    (read from /proc/<pid>/environ as the user the process runs as)."""
    script = (
        'for p in /proc/[0-9]*; do [ "${p#/proc/}" = "$$" ] && continue; '
        "c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null) || continue; "
        'case "$c" in *"$PATTERN"*) tr "\\0" "\\n" < $p/environ; exit 0 ;; esac; done; exit 1'
    )
    command = f"docker exec -u lab -e PATTERN={shlex.quote(pattern)} {CONTAINER} sh -c {shlex.quote(script)}"
    out = host_exec(host, command).stdout
    values = [line.split("=", 1)[1] for line in out.splitlines() if line.startswith(f"{name}=")]
    return values[0] if values else None


def _old_layout(host) -> None:
    """Recreate the container as a labfleet without home_dir left it: HOME in its own layer."""
    model = yaml.safe_load(host_exec(host, f"cat {PROJECT}/compose.yaml").stdout)
    service = model["services"]["jupyterlab"]
    service["volumes"] = [v for v in service["volumes"] if v["source"] != "${HOME_LOCALDIR}"]
    service["labels"]["org.labfleet.config"] = "before-home-dir"
    host_exec(host, f"cat > {PROJECT}/compose.yaml", input=yaml.safe_dump(model))
    host_exec(host, f"cd {PROJECT} && docker compose up -d --wait --wait-timeout 300")
    mounts = host_exec(host, f"docker inspect --format '{{{{json .Mounts}}}}' {CONTAINER}").stdout
    assert "/home/lab" not in mounts, "the hand-made container still mounts HOME"


def _leaks(host, values: list[str], *texts: str) -> list[str]:
    """Where any of the values shows: docker inspect, ps, the container's logs, and the given texts."""
    places = {
        "docker inspect": host_exec(host, f"docker inspect {CONTAINER}").stdout,
        "image inspect": host_exec(
            host, f"docker image inspect $(docker inspect -f '{{{{.Image}}}}' {CONTAINER})"
        ).stdout,
        "ps": host_exec(host, "ps -eo args").stdout,
        "docker logs": host_exec(host, f"docker logs {CONTAINER} 2>&1").stdout,
        **{f"pyinfra run {i}": text for i, text in enumerate(texts)},
    }
    return [f"{value[:6]}... in {place}" for place, text in places.items() for value in values if value in text]


def test_home_and_secrets_survive_the_switch_and_a_recreate(make_hosts, pyinfra_run, lab_data, tmp_path):
    (host,) = make_hosts(1, engine=True)
    first, second = (f"wandb-{secrets.token_hex(16)}" for _ in range(2))
    secret_file = tmp_path / "wandb_api_key"
    secret_file.write_text(first + "\n")
    data = {
        **lab_data,
        # A kernel runs during the test; this test is about the home, not about waiting for idle.
        "jupyter_update": "now",
        "jupyter_env": {"WANDB_PROJECT": "lab-e2e", "PRICE": "$5"},
        "jupyter_secrets": {"WANDB_API_KEY": str(secret_file)},
    }

    # 1. The first deploy: env and secret in the server's environment, never in its configuration.
    runs = [pyinfra_run([host], data=data)]
    assert_converged(runs[-1])
    assert host_exec(host, f"stat -c '%U %a' {HOME} {PROJECT}/secrets {PROJECT}/secrets/WANDB_API_KEY").stdout.split(
        "\n"
    )[:3] == ["lab 700", "root 700", "lab 600"]
    assert _environ(host, "jupyter-lab", "WANDB_API_KEY") == first
    assert _environ(host, "jupyter-lab", "WANDB_PROJECT") == "lab-e2e"
    assert _environ(host, "jupyter-lab", "PRICE") == "$5"
    assert host_exec(host, f"test -f {HOME}/.bashrc && stat -c %U {HOME}/.bashrc").stdout.strip() == "lab", (
        "the image's bash defaults were not seeded into the empty home"
    )
    assert_no_changes(pyinfra_run([host], data=data))

    # 2. The layout before home_dir, with work in the container's own HOME.
    _old_layout(host)
    host_exec(
        host,
        f"docker exec -u lab {CONTAINER} sh -c "
        + shlex.quote(
            "cd && echo layer > from-layer.txt && echo layer > kept.txt && mkdir -p .ssh && echo k > .ssh/id_x"
        ),
    )
    host_exec(host, f"echo host > {HOME}/kept.txt && chown lab:lab {HOME}/kept.txt")

    # 3. The deploy that brings home_dir copies that HOME first, and keeps what home_dir had.
    runs.append(pyinfra_run([host], data=data))
    assert_converged(runs[-1])
    # The copy is the keep-home script that the recreate itself runs (so does the update timer).
    assert runs[-1].status(host, "Bring up JupyterLab of lab") == "success"
    assert host_exec(host, f"cat {HOME}/from-layer.txt {HOME}/kept.txt").stdout.split() == ["layer", "host"]
    assert host_exec(host, f"stat -c %U {HOME}/from-layer.txt {HOME}/.ssh/id_x").stdout.split() == ["lab", "lab"]
    mounts = host_exec(host, f"docker inspect --format '{{{{json .Mounts}}}}' {CONTAINER}").stdout
    assert HOME in mounts
    assert_no_changes(pyinfra_run([host], data=data))

    # 4. Work in HOME and a JupyterLab setting, then a rotated secret (under -vvv).
    host_exec(host, f"docker exec -u lab {CONTAINER} sh -c 'echo notes > ~/notes.txt'")
    put = _api(host, "PUT", f"/lab/api/settings/{THEMES}", {"raw": json.dumps({"theme": "JupyterLab Dark"})})
    assert put.splitlines()[-1] == "204", put
    secret_file.write_text(second + "\n")
    runs.append(pyinfra_run([host], data=data, args=["-vvv"]))
    assert_converged(runs[-1])
    assert runs[-1].status(host, "Write the secret WANDB_API_KEY of lab") == "success"
    assert runs[-1].status(host, "Bring up JupyterLab of lab") == "success"
    assert health(host) == "healthy"
    assert _environ(host, "jupyter-lab", "WANDB_API_KEY") == second
    kernel = json.loads(_api(host, "POST", "/api/kernels", {"name": "python3"}).rsplit("\n", 1)[0])
    assert _environ(host, kernel["id"], "WANDB_API_KEY") == second, "a kernel does not see the secret"
    settings = json.loads(_api(host, "GET", f"/lab/api/settings/{THEMES}").rsplit("\n", 1)[0])
    assert json.loads(settings["raw"]) == {"theme": "JupyterLab Dark"}, "the JupyterLab setting was lost"
    assert host_exec(host, f"cat {HOME}/notes.txt {HOME}/from-layer.txt").stdout.split() == ["notes", "layer"]
    runs.append(pyinfra_run([host], data=data))
    assert_no_changes(runs[-1])

    # 5. Nowhere in the container's configuration, processes, logs or pyinfra's output.
    outputs = [run.stdout + run.stderr for run in runs]
    assert _leaks(host, [first, second], *outputs) == []

    # 6. A secret taken out of the settings leaves the host and the server's environment.
    without = {**data, "jupyter_secrets": {}}
    runs.append(pyinfra_run([host], data=without))
    assert_converged(runs[-1])
    assert runs[-1].status(host, "Remove the secret WANDB_API_KEY of lab, no longer in jupyter_secrets") == "success"
    assert host_exec(host, f"ls -A {PROJECT}/secrets").stdout.strip() == ""
    assert _environ(host, "jupyter-lab", "WANDB_API_KEY") is None
    assert_no_changes(pyinfra_run([host], data=without))

    # 7. The status reports the home's size (what du counts on the host).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LABFLEET_STATUS_FORMAT", "json")
        status = pyinfra_run([host], deploy="status.py", data=without)
    document, _ = json.JSONDecoder().raw_decode(status.stdout.lstrip())
    assert status.rc == 0 and document["ok"] is True, document["drift"]
    (user,) = document["hosts"][0]["users"]
    counted = int(host_exec(host, f"du -skx {HOME}").stdout.split()[0]) * 1024
    assert (user["home"], user["home_bytes"], user["home_counted"]) == (HOME, counted, True)
