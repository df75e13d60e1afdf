"""The compose project of one jupyter user: its compose.yaml model and its .env values.

compose.yaml holds the structure and refers to per-host values as ${VARIABLES}; .env
holds exactly those values, so an admin can still run `docker compose` by hand in the
project directory, as with the hand-made setup.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import jinja2
import yaml

from labfleet import dotenv
from labfleet.settings import REPO_ROOT, JupyterUser, Settings

APP_ROOT = "/opt/labfleet"
CONTAINER_PORT = 8888
DATASET_DIR = "/resource/datasets"
WORKSPACE_DIR = "/workspace"
# The entrypoint makes /home/$NB_USER the user's HOME; home_dir is mounted there.
HOME_PARENT = "/home"
SECRETS_DIR = "/run/secrets"
TOKEN_SECRET = "jupyter_token"
PASSWORD_SECRET = "jupyter_password_hash"
CONFIG_LABEL = "org.labfleet.config"
SERVICE = "jupyterlab"


def project_directory(user: str) -> str:
    return f"{APP_ROOT}/{user}"


# Every labfleet compose project is this and the user's name: how the status tells a lab
# user's container from any other (labfleet.gpu_usage).
PROJECT_PREFIX = "labfleet-"


def project_name(user: str) -> str:
    return f"{PROJECT_PREFIX}{user}"


# In each project directory: run before every recreate of its container, by the deploy and by
# the update timer (labfleet.jupyter.keep_home_script).
KEEP_HOME = "keep-home"


def container_home(user: str) -> str:
    return f"{HOME_PARENT}/{user}"


def secrets_directory(user: str) -> str:
    """Where the host keeps the user's jupyter_secrets, one file per variable, each 0600."""
    return f"{project_directory(user)}/secrets"


def container_name(project: str) -> str:
    """The name Compose v2 gives the service's first container: <project>-<service>-1."""
    return f"{project}-{SERVICE}-1"


@dataclass(frozen=True)
class Project:
    """What one user's compose project needs beyond the settings: facts of the host."""

    settings: Settings
    user: JupyterUser
    uid: int
    gid: int
    gpu: bool
    image: str
    # The account's primary group, which owns the workspace (None: a group named like the user).
    group_name: str | None = None

    @property
    def group(self) -> str:
        return self.group_name or self.user.name

    @property
    def directory(self) -> str:
        return project_directory(self.user.name)

    @property
    def name(self) -> str:
        return project_name(self.user.name)


def env_values(project: Project) -> dict[str, object]:
    s = project.settings
    return {
        "LABFLEET_IMAGE": project.image,
        "NB_USER": project.user.name,
        "NB_UID": project.uid,
        "NB_GID": project.gid,
        "JUPYTER_BIND": s.jupyter_bind,
        "JUPYTER_PORT": project.user.port,
        "WORKSPACE_LOCALDIR": project.user.workspace_dir,
        "HOME_LOCALDIR": project.user.home_dir,
        "DATASET_LOCALDIR": s.datasets_root,
        "DATASET_DIR": DATASET_DIR,
        "SHM_SIZE": s.shm_size,
        "JUPYTER_CULL_IDLE_SECONDS": s.jupyter_cull_idle,
    }


def _gpu_reservation(devices) -> dict:
    device: dict = {"driver": "nvidia", "capabilities": ["gpu"]}
    if devices == "all" or isinstance(devices, int):
        device["count"] = devices
    else:
        device["device_ids"] = list(devices)
    return {"resources": {"reservations": {"devices": [device]}}}


def _dataset_mounts(settings: Settings) -> list[dict]:
    # The datasets root is read-only; a dataset that says readonly: false is mounted
    # again, writable, over its own directory.
    mounts = [{"type": "bind", "source": "${DATASET_LOCALDIR}", "target": "${DATASET_DIR}", "read_only": True}]
    for dataset in settings.datasets:
        if not dataset.readonly:
            mounts.append(
                {
                    "type": "bind",
                    "source": f"${{DATASET_LOCALDIR}}/{dataset.name}",
                    "target": f"${{DATASET_DIR}}/{dataset.name}",
                    "read_only": False,
                }
            )
    return mounts


def url(settings: Settings, port: int) -> str:
    """How a person opens this user's JupyterLab: through a tunnel when it is bound to loopback."""
    bind = settings.jupyter_bind
    address = settings.lan_address if bind in ("0.0.0.0", "::") else bind
    address = f"[{address}]" if ":" in address else address
    return f"http://{address}:{port}/lab"


def project_digest(project: Project) -> str:
    """The digest of the settings a current container of this project was started with (its label)."""
    return compose_model(project)["services"]["jupyterlab"]["labels"][CONFIG_LABEL]


def compose_model(project: Project) -> dict:
    # /api answers without auth and costs nothing; python3 is in the image, curl is not.
    api = f"http://127.0.0.1:{CONTAINER_PORT}/api"
    healthcheck_probe = f"import urllib.request; urllib.request.urlopen('{api}', timeout=5)"
    service: dict = {
        "image": "${LABFLEET_IMAGE}",
        "init": True,
        "restart": "unless-stopped",
        "environment": {
            "NB_USER": "${NB_USER}",
            "NB_UID": "${NB_UID}",
            "NB_GID": "${NB_GID}",
            "JUPYTER_TOKEN_FILE": f"/run/secrets/{TOKEN_SECRET}",
            "WORKSPACE_DIR": WORKSPACE_DIR,
            "DATASET_DIR": "${DATASET_DIR}",
            # Read by container/jupyter_server_config.py when the server starts (0: no culling).
            "JUPYTER_CULL_IDLE_SECONDS": "${JUPYTER_CULL_IDLE_SECONDS}",
        },
        "ports": [f"${{JUPYTER_BIND}}:${{JUPYTER_PORT}}:{CONTAINER_PORT}"],
        "volumes": [
            {"type": "bind", "source": "${WORKSPACE_LOCALDIR}", "target": WORKSPACE_DIR},
            {"type": "bind", "source": "${HOME_LOCALDIR}", "target": f"{HOME_PARENT}/${{NB_USER}}"},
            *_dataset_mounts(project.settings),
        ],
        "secrets": [TOKEN_SECRET],
        "shm_size": "${SHM_SIZE}",
        "ulimits": dict(project.settings.ulimits),
        "security_opt": ["no-new-privileges:true"],
        "healthcheck": {
            "test": ["CMD", "python3", "-c", healthcheck_probe],
            "interval": "30s",
            "timeout": "10s",
            "start_period": "60s",
            # Probed every 2 s while starting (engines >= 25), so `up --wait` returns in seconds.
            "start_interval": "2s",
            "retries": 3,
        },
    }
    secrets = {TOKEN_SECRET: {"file": f"./{TOKEN_SECRET}"}}
    if project.settings.jupyter_password_hash:
        # The hash is a file too: an environment variable would show in `docker inspect`.
        service["secrets"].append(PASSWORD_SECRET)
        service["environment"]["JUPYTER_PASSWORD_HASH_FILE"] = f"/run/secrets/{PASSWORD_SECRET}"
        secrets[PASSWORD_SECRET] = {"file": f"./{PASSWORD_SECRET}"}
    # Plain values go into compose.yaml as written ($ doubled: compose would interpolate it).
    for name, value in project.user.env:
        service["environment"][name] = value.replace("$", "$$")
    # Secrets are files, mounted read-only at /run/secrets/<NAME>; the entrypoint exports the
    # ones LABFLEET_SECRETS names, so only the names are in the container's configuration.
    if project.user.secrets:
        names = [name for name, _ in project.user.secrets]
        service["environment"]["LABFLEET_SECRETS"] = " ".join(names)
        service["secrets"] += names
        secrets.update({name: {"file": f"./secrets/{name}"} for name in names})
    if project.gpu:
        service["deploy"] = _gpu_reservation(project.settings.gpu_devices)
    model = {"name": project.name, "services": {SERVICE: service}, "secrets": secrets}
    # The running container carries a digest of everything compose is given, so a run can
    # tell from one `docker inspect` whether the container is current. The password hash
    # counts too, and each secret's content: the server reads them only when it starts.
    secret = (project.settings.jupyter_password_hash or "") + secret_fingerprint(project)
    service["labels"] = {CONFIG_LABEL: config_digest(model, env_values(project), secret)}
    return model


def secret_fingerprint(project: Project) -> str:
    """A digest of the secrets' values, read from the controller's files: a changed secret changes only
    the digest of the users who have it, so only their containers are recreated."""
    digest = hashlib.sha256()
    for name, path in project.user.secrets:
        digest.update(name.encode() + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest() if project.user.secrets else ""


def config_digest(model: dict, env: dict, secret: str = "") -> str:
    blob = json.dumps([model, {k: str(v) for k, v in env.items()}, secret], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_yaml(value) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, width=1000)


@cache
def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(REPO_ROOT / "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["to_yaml"] = _to_yaml
    env.filters["dotenv"] = dotenv.render
    return env


def render_compose(project: Project) -> str:
    return _templates().get_template("compose.yaml.j2").render(compose=compose_model(project)).rstrip("\n") + "\n"


def render_env(project: Project) -> str:
    return _templates().get_template("env.j2").render(env=env_values(project)).rstrip("\n") + "\n"
