"""compose.yaml and .env rendered from settings, parsed back and checked field by field."""

import re
from pathlib import Path

import pytest
import yaml

from labfleet import compose, dotenv, image
from labfleet.settings import build


def _project(raw, gpu=False, **overrides):
    raw.update(overrides)
    s = build("pc01", raw)
    return compose.Project(s, s.jupyter_user, 1234, 2345, gpu, image.image_tag(s))


def _service(project):
    return yaml.safe_load(compose.render_compose(project))["services"]["jupyterlab"]


def test_compose_fields(raw):
    project = _project(raw)
    doc = yaml.safe_load(compose.render_compose(project))
    assert doc["name"] == "labfleet-alice"
    service = doc["services"]["jupyterlab"]
    assert service["image"] == "${LABFLEET_IMAGE}"
    assert service["init"] is True
    assert service["restart"] == "unless-stopped"
    assert service["ports"] == ["${JUPYTER_BIND}:${JUPYTER_PORT}:8888"]
    assert service["shm_size"] == "${SHM_SIZE}"
    assert service["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert service["security_opt"] == ["no-new-privileges:true"]
    assert service["environment"]["JUPYTER_TOKEN_FILE"] == "/run/secrets/jupyter_token"
    assert "JUPYTER_TOKEN" not in service["environment"]
    assert service["secrets"] == ["jupyter_token"]
    assert doc["secrets"] == {"jupyter_token": {"file": "./jupyter_token"}}
    workspace, home, datasets = service["volumes"]
    assert workspace == {"type": "bind", "source": "${WORKSPACE_LOCALDIR}", "target": "/workspace"}
    assert home == {"type": "bind", "source": "${HOME_LOCALDIR}", "target": "/home/${NB_USER}"}
    assert datasets == {"type": "bind", "source": "${DATASET_LOCALDIR}", "target": "${DATASET_DIR}", "read_only": True}
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python3", "-c"] and "http://127.0.0.1:8888/api" in test[3]
    assert "deploy" not in service


@pytest.mark.parametrize(
    ("devices", "expected"),
    [("all", {"count": "all"}), (2, {"count": 2}), (["0", "3"], {"device_ids": ["0", "3"]})],
)
def test_gpu_reservation_only_on_gpu_hosts(raw, devices, expected):
    service = _service(_project(raw, gpu=True, gpu_devices=devices))
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "capabilities": ["gpu"], **expected}


def test_writable_dataset_is_mounted_over_the_readonly_root(raw):
    datasets = {"imagenet": {"source": "manual"}, "scratch": {"source": "manual", "readonly": False}}
    volumes = _service(_project(raw, datasets=datasets))["volumes"]
    assert volumes[2]["read_only"] is True
    assert volumes[3:] == [
        {
            "type": "bind",
            "source": "${DATASET_LOCALDIR}/scratch",
            "target": "${DATASET_DIR}/scratch",
            "read_only": False,
        }
    ]


def test_password_hash_is_a_secret_file_not_an_environment_value(raw):
    hashed = "$argon2id$v=19$m=10240,t=10,p=8$c2FsdHNhbHQ$aGFzaGhhc2g"
    project = _project(raw, jupyter_password_hash=hashed)
    rendered = compose.render_compose(project) + compose.render_env(project)
    assert "c2FsdHNhbHQ" not in rendered
    service = _service(project)
    assert service["secrets"] == ["jupyter_token", "jupyter_password_hash"]
    assert service["environment"]["JUPYTER_PASSWORD_HASH_FILE"] == "/run/secrets/jupyter_password_hash"


def test_env_holds_exactly_what_compose_interpolates(raw):
    project = _project(raw, datasets={"scratch": {"source": "manual", "readonly": False}})
    used = set(re.findall(r"\$\{([A-Z_]+)\}", compose.render_compose(project)))
    env = parse_dotenv(compose.render_env(project))
    assert set(env) == used
    assert env == {
        "LABFLEET_IMAGE": image.image_tag(project.settings),
        "NB_USER": "alice",
        "NB_UID": "1234",
        "NB_GID": "2345",
        "JUPYTER_BIND": "127.0.0.1",
        "JUPYTER_PORT": "8888",
        "WORKSPACE_LOCALDIR": "/srv/workspace/alice",
        "HOME_LOCALDIR": "/srv/home/alice",
        "DATASET_LOCALDIR": "/srv/datasets",
        "DATASET_DIR": "/resource/datasets",
        "SHM_SIZE": "16g",
        "JUPYTER_CULL_IDLE_SECONDS": "86400",
    }


def parse_dotenv(text: str) -> dict[str, str]:
    """A reading of compose's dotenv rules for the two quoted forms labfleet writes."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        if value.startswith("'") and value.endswith("'"):
            out[key] = value[1:-1]
        elif value.startswith('"') and value.endswith('"'):
            body = value[1:-1].replace("$$", "\0")
            assert "$" not in body, f"unescaped $ in {line}"
            out[key] = re.sub(r"\\(.)", r"\1", body).replace("\0", "$")
        else:
            raise AssertionError(f"unquoted value in {line}")
    return out


TRICKY = [
    "/srv/work space/alice",
    "/srv/$HOME/${USER}/x",
    "/srv/#hash # comment",
    "/srv/it's/alice",
    '/srv/"quoted"/alice',
    "/srv/mixed 'single' \"double\" $dollar #hash\\back",
    "/srv/ends-with-backslash\\",
]


@pytest.mark.parametrize("value", TRICKY)
def test_dotenv_round_trips_awkward_values(value):
    assert parse_dotenv(dotenv.render({"WORKSPACE_LOCALDIR": value})) == {"WORKSPACE_LOCALDIR": value}


def test_dotenv_refuses_newlines():
    with pytest.raises(ValueError, match="newline"):
        dotenv.quote("a\nb")


def test_awkward_workspace_path_survives_rendering(raw):
    raw["jupyter_user"] = "alice"
    project = _project(raw, workspace_dir="/srv/work space/$x #1 it's/{user}")
    assert parse_dotenv(compose.render_env(project))["WORKSPACE_LOCALDIR"] == "/srv/work space/$x #1 it's/alice"


def test_image_tag_is_a_content_hash_of_context_and_args(raw, tmp_path):
    s = build("pc01", raw)
    (tmp_path / "Dockerfile").write_text("FROM x\n")
    first = image.image_tag(s, tmp_path)
    assert re.fullmatch(r"labfleet/jupyterlab:pytorch-[0-9a-f]{12}", first)
    image._context_digest.cache_clear()
    assert image.image_tag(s, tmp_path) == first
    (tmp_path / "Dockerfile").write_text("FROM y\n")
    image._context_digest.cache_clear()
    assert image.image_tag(s, tmp_path) != first
    other = build("pc01", {**raw, "cuda": "13.0"})
    assert image.image_tag(other) != image.image_tag(s)


def test_a_new_password_hash_changes_the_config_digest(raw):
    first = "$argon2id$v=19$m=10240,t=10,p=8$c2FsdHNhbHQ$aGFzaGhhc2g"
    second = "$argon2id$v=19$m=10240,t=10,p=8$c2FsdHNhbHQ$b3RoZXJoYXNo"
    labels = [
        _service(_project(dict(raw), jupyter_password_hash=value))["labels"][compose.CONFIG_LABEL]
        for value in (first, second)
    ]
    assert labels[0] != labels[1], "a rotated password would not restart the server"


def test_env_values_are_written_as_given_and_user_entries_win(raw):
    raw["jupyter_user"] = None
    raw["jupyter_env"] = {"WANDB_PROJECT": "lab", "SEED": 7, "PRICE": "$5"}
    raw["jupyter_users"] = ["alice", {"name": "bob", "env": {"WANDB_PROJECT": "bobs"}}]
    s = build("pc01", raw)
    alice, bob = (_service(compose.Project(s, user, 1234, 2345, False, "x")) for user in s.jupyter_users)
    assert alice["environment"]["WANDB_PROJECT"] == "lab"
    assert alice["environment"]["SEED"] == "7"
    assert alice["environment"]["PRICE"] == "$$5", "compose would read $5 as a variable"
    assert bob["environment"]["WANDB_PROJECT"] == "bobs"


def _secret(tmp_path, name, value):
    path = tmp_path / name
    path.write_text(value)
    return str(path)


def test_secrets_are_mounted_files_and_only_their_names_are_in_the_environment(raw, tmp_path):
    wandb = _secret(tmp_path, "wandb", "wandb-value-1234")
    project = _project(raw, jupyter_secrets={"WANDB_API_KEY": wandb})
    rendered = compose.render_compose(project) + compose.render_env(project)
    assert "wandb-value-1234" not in rendered
    doc = yaml.safe_load(compose.render_compose(project))
    service = doc["services"]["jupyterlab"]
    assert service["secrets"] == ["jupyter_token", "WANDB_API_KEY"]
    assert doc["secrets"]["WANDB_API_KEY"] == {"file": "./secrets/WANDB_API_KEY"}
    assert service["environment"]["LABFLEET_SECRETS"] == "WANDB_API_KEY"
    assert "WANDB_API_KEY" not in service["environment"]


def test_a_changed_secret_changes_only_the_digest_of_its_user(raw, tmp_path):
    raw["jupyter_user"] = None
    token = _secret(tmp_path, "hf", "first")
    raw["jupyter_users"] = ["alice", {"name": "bob", "secrets": {"HF_TOKEN": token}}]

    def digests():
        s = build("pc01", raw)
        return [compose.project_digest(compose.Project(s, user, 1234, 2345, False, "x")) for user in s.jupyter_users]

    before = digests()
    Path(token).write_text("second")
    after = digests()
    assert before[0] == after[0], "alice has no secret; her container must stay"
    assert before[1] != after[1], "bob's new secret would not reach his server"
