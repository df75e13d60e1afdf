"""labfleet/image.py and container/: the tag, the build context, the build helper, the recipe's files."""

import json
import os
import re
import runpy
import stat
import subprocess
from pathlib import Path

import pytest

from labfleet import image
from labfleet.settings import REPO_ROOT as REPO
from labfleet.settings import build

CONTAINER = REPO / "container"
DEFAULTS = image.controller_settings()
PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


@pytest.fixture
def context(tmp_path):
    root = tmp_path / "container"
    (root / "scripts").mkdir(parents=True)
    (root / "Dockerfile").write_text("FROM x\n")
    (root / "scripts" / "start.sh").write_text("#!/bin/sh\n")
    (root / "scripts" / "start.sh").chmod(0o755)
    (root / "certs").mkdir()
    (root / "certs" / "README").write_text("CAs go here\n")
    image._context_digest.cache_clear()
    yield root
    image._context_digest.cache_clear()


def _ca(tmp_path, name="lab-ca.crt", body=PEM):
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def _settings(raw, **overrides):
    raw.update(overrides)
    return build("pc01", raw)


def test_tag_format_and_stability(raw, context):
    s = _settings(raw, image_profile="jupyter")
    tag = image.image_tag(s, context)
    assert re.fullmatch(r"labfleet/jupyterlab:jupyter-[0-9a-f]{12}", tag)
    image._context_digest.cache_clear()
    assert image.image_tag(s, context) == tag


@pytest.mark.parametrize(
    "change",
    [
        lambda root: (root / "Dockerfile").write_text("FROM y\n"),
        lambda root: (root / "scripts" / "new.sh").write_text(""),
        lambda root: (root / "scripts" / "start.sh").rename(root / "scripts" / "begin.sh"),
    ],
    ids=["content", "new-file", "rename"],
)
def test_tag_follows_the_context(raw, context, change):
    s = _settings(raw)
    before = image.image_tag(s, context)
    change(context)
    image._context_digest.cache_clear()
    assert image.image_tag(s, context) != before


def test_tag_ignores_modes_and_caches(raw, context):
    s = _settings(raw)
    before = image.image_tag(s, context)
    (context / "Dockerfile").chmod(0o600)
    (context / "scripts" / "start.sh").chmod(0o644)
    (context / "__pycache__").mkdir()
    (context / "__pycache__" / "x.pyc").write_bytes(b"junk")
    image._context_digest.cache_clear()
    assert image.image_tag(s, context) == before


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cuda", "13.0"),
        ("image_profile", "jupyter"),
        ("base_image", "debian:trixie@sha256:" + "a" * 64),
    ],
)
def test_tag_follows_each_build_arg(raw, context, key, value):
    assert image.image_tag(_settings(dict(raw)), context) != image.image_tag(_settings(raw, **{key: value}), context)


def test_tag_covers_the_extra_ca_files(raw, context, tmp_path):
    plain = image.image_tag(_settings(dict(raw)), context)
    ca = _ca(tmp_path)
    with_ca = image.image_tag(_settings(dict(raw), extra_ca_certificates=[ca]), context)
    assert with_ca != plain
    Path(ca).write_text(PEM.replace("fake", "other"))
    assert image.image_tag(_settings(raw, extra_ca_certificates=[ca]), context) not in (plain, with_ca)


def test_build_args_name_the_base_the_profile_and_its_lock(raw):
    s = _settings(raw, image_profile="jupyter", cuda="13.0")
    assert image.build_args(s) == {"BASE_IMAGE": s.base_image, "PROFILE": "jupyter", "LOCK": "jupyter"}
    # One lock serves every CUDA line: the same image, under the same tag.
    assert image.image_tag(_settings(raw, image_profile="jupyter", cuda="12.8")) == image.image_tag(s)
    assert image.build_args(_settings(raw, image_profile="pytorch", cuda="12.6"))["LOCK"] == "pytorch-cu126"


def test_a_profile_without_a_lock_is_refused_naming_the_relock_command(raw):
    # checks.py refuses it in a deploy; a bench or a test that builds directly gets the same advice.
    s = _settings(raw, image_profile="pytorch", cuda="12.8")
    object.__setattr__(s, "cuda", "12.4")
    with pytest.raises(image.ImageBuildError, match=r"container/relock\.sh pytorch --cuda 12\.4"):
        image.build_args(s)


def test_context_is_container_plus_certs(raw, context, tmp_path):
    ca = _ca(tmp_path, "proxy.crt")
    s = _settings(raw, extra_ca_certificates=[ca])
    files = image.context_files(s, context)
    certs = [name for name in files if name.startswith("certs/") and name.endswith(".crt")]
    # Where update-ca-certificates reads them in the image: the Dockerfile copies certs/ to /.
    where = "certs/usr/local/share/ca-certificates/labfleet"
    assert len(certs) == 1 and re.fullmatch(rf"{where}/proxy-[0-9a-f]{{8}}\.crt", certs[0])
    assert {"Dockerfile", "scripts/start.sh", "certs/README"} <= set(files)

    out = image.assemble_context(s, tmp_path / "ctx", context)
    assert (out / certs[0]).read_text() == PEM
    assert stat.S_IMODE((out / "scripts" / "start.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "Dockerfile").stat().st_mode) == 0o644
    # One time for every file and directory: COPY keeps them, and a layer's digest covers them.
    times = {path.stat().st_mtime for path in [out, *out.rglob("*")]}
    assert times == {image.SOURCE_DATE_EPOCH}
    with pytest.raises(ValueError, match="must be empty"):
        image.assemble_context(s, out, context)


FAKE_ENGINE = """#!/bin/sh
echo "$*" >> "$LOG"
case "$1 $2" in
  "image inspect") exit "$INSPECT_RC" ;;
  "buildx version") exit 1 ;;
  "build "*) echo "DOCKER_BUILDKIT=$DOCKER_BUILDKIT" >> "$LOG"; for last; do :; done; ls -R "$last" >> "$LOG";
           echo "Step 1/1 : FROM x"; echo "boom" >&2; exit "$BUILD_RC" ;;
esac
"""


@pytest.fixture
def engine(tmp_path, monkeypatch):
    script = tmp_path / "fake-docker"
    script.write_text(FAKE_ENGINE)
    script.chmod(0o755)
    log = tmp_path / "engine.log"
    monkeypatch.setenv("LOG", str(log))
    monkeypatch.setenv("INSPECT_RC", "1")
    monkeypatch.setenv("BUILD_RC", "0")
    monkeypatch.delenv("DOCKER_BUILDKIT", raising=False)
    monkeypatch.delenv(image.WHEELS_ENV, raising=False)
    return (str(script),), log


def test_build_image_builds_under_the_tag(raw, context, engine):
    engine_cmd, log = engine
    s = _settings(raw, image_profile="jupyter")
    result = image.build_image(s, engine_cmd, context=context, labels={"test": "1"})
    assert result.built and result.tag == image.image_tag(s, context)
    text = log.read_text()
    assert f"--tag {result.tag}" in text
    assert "--label test=1" in text and f"--label {image.TAG_LABEL}={result.tag}" in text
    assert f"--build-arg PROFILE=jupyter --build-arg CUDA={s.cuda}" not in text  # sorted, not this order
    for key, value in image.build_args(s).items():
        assert f"--build-arg {key}={value}" in text
    assert "DOCKER_BUILDKIT=0" in text  # no buildx: the legacy builder
    assert "start.sh" in text  # the assembled context reached the engine


def test_a_build_without_a_wheel_cache_uses_the_index_on_the_default_network(raw, context, engine):
    engine_cmd, log = engine
    image.build_image(_settings(raw, image_profile="jupyter"), engine_cmd, context=context)
    assert "--network" not in log.read_text() and "PIP_" not in log.read_text()


@pytest.mark.parametrize("from_env", [False, True], ids=["argument", "LABFLEET_BUILD_WHEELS"])
def test_a_wheel_cache_replaces_the_index_and_keeps_the_tag(raw, context, engine, monkeypatch, from_env):
    engine_cmd, log = engine
    s = _settings(raw, image_profile="jupyter")
    url = "http://127.0.0.1:41000/"
    if from_env:
        monkeypatch.setenv(image.WHEELS_ENV, url)
    result = image.build_image(s, engine_cmd, context=context, **({} if from_env else {"wheels": url}))
    text = log.read_text()
    assert f"--network host --build-arg PIP_FIND_LINKS={url} --build-arg PIP_NO_INDEX=1" in text
    assert result.tag == image.image_tag(s, context)


def test_the_wheel_cache_arguments_are_declared_without_a_value_before_the_install():
    # Unset, they leave the product image and its layer cache as they were; set, pip reads them.
    text = (CONTAINER / "Dockerfile").read_text()
    install = text.index("RUN sh /labfleet-install-layer.sh")
    for name in ("PIP_FIND_LINKS", "PIP_NO_INDEX"):
        assert re.search(rf"^ARG {name}$", text[:install], re.M), f"container/Dockerfile lacks a bare ARG {name}"


def test_a_build_under_another_repository_leaves_the_deploy_tag_alone(raw, context, engine):
    engine_cmd, log = engine
    s = _settings(raw, image_profile="jupyter")
    deploy_tag = image.image_tag(s, context)
    result = image.build_image(s, engine_cmd, context=context, repository="labfleet-bench/jupyterlab", force=True)
    assert result.tag == "labfleet-bench/jupyterlab:" + deploy_tag.split(":", 1)[1]
    assert f"--tag {result.tag}" in log.read_text()
    assert deploy_tag not in log.read_text()


def test_build_image_skips_an_existing_tag(raw, context, engine, monkeypatch):
    engine_cmd, log = engine
    monkeypatch.setenv("INSPECT_RC", "0")
    result = image.build_image(_settings(raw), engine_cmd, context=context)
    assert not result.built
    assert " build " not in f" {log.read_text()}"


def test_build_image_failure_names_the_tag_and_the_cause(raw, context, engine, monkeypatch):
    engine_cmd, _ = engine
    monkeypatch.setenv("BUILD_RC", "3")
    s = _settings(raw, image_profile="jupyter")
    with pytest.raises(image.ImageBuildError) as error:
        image.build_image(s, engine_cmd, context=context)
    message = str(error.value)
    assert image.image_tag(s, context) in message and "exit 3" in message and "boom" in message


def test_a_build_past_its_timeout_says_what_to_check(raw, context, engine, monkeypatch):
    engine_cmd, _ = engine

    def too_slow(argv, *args, **kwargs):
        raise subprocess.TimeoutExpired(argv, kwargs["timeout"])

    monkeypatch.setattr(image.progress, "run_on_controller", too_slow)
    s = _settings(raw, image_profile="jupyter")
    with pytest.raises(image.ImageBuildError, match=r"did not finish within 5 s; check the network"):
        image.build_image(s, engine_cmd, context=context, timeout=5)


def test_controller_settings_are_the_defaults_plus_overrides():
    s = image.controller_settings(image_profile="jupyter")
    assert s.image_profile == "jupyter"
    assert s.base_image == DEFAULTS.base_image and s.cuda == DEFAULTS.cuda


# --- container/ -------------------------------------------------------------------------


def _dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (CONTAINER / "Dockerfile").read_text(), re.M)
    assert match, f"container/Dockerfile has no ARG {name}=<default>"
    return match.group(1)


def test_dockerfile_defaults_are_group_data_defaults():
    assert _dockerfile_arg("BASE_IMAGE") == DEFAULTS.base_image
    assert _dockerfile_arg("PROFILE") == DEFAULTS.image_profile
    assert _dockerfile_arg("LOCK") == image.build_args(DEFAULTS)["LOCK"]


def test_dockerfile_keeps_secrets_and_cuda_bases_out():
    text = (CONTAINER / "Dockerfile").read_text()
    assert "nvidia/cuda" not in re.sub(r"^#.*$", "", text, flags=re.M)
    assert not re.search(r"^(ENV|ARG)\b.*(TOKEN|PASSWORD|SECRET)", text, re.M | re.I)
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
    assert re.search(r"^HEALTHCHECK .*--interval=30s.*--start-period=", text, re.M)
    assert re.search(r'^ENTRYPOINT \["tini", "-g", "-s", "--", "start.sh"\]$', text, re.M)


@pytest.mark.parametrize("lock", sorted(p.name for p in (CONTAINER / "requirements").glob("*.txt")))
def test_every_lock_pins_every_package_by_hash(lock):
    text = (CONTAINER / "requirements" / lock).read_text()
    requirements = re.findall(r"^([A-Za-z0-9._-]+)==\S+", text, re.M)
    assert requirements
    for block in re.split(r"\n(?=[A-Za-z0-9._-]+==)", text)[1:]:
        assert "--hash=sha256:" in block, f"{lock}: no hash for {block.splitlines()[0]}"
    assert not re.search(r"/(home|root|tmp|work|usr)/", text), f"{lock} names a path of the machine that locked it"


def test_the_default_profile_and_the_test_profile_are_locked():
    locks = CONTAINER / "requirements"
    cuda = DEFAULTS.cuda.replace(".", "")
    assert (locks / f"{DEFAULTS.image_profile}-cu{cuda}.txt").is_file()
    assert (locks / "jupyter.txt").is_file()


def test_scripts_are_executable_for_people():
    # The image sets its own modes; these bits are for running them from a checkout.
    for path in [*(CONTAINER / "scripts").iterdir(), CONTAINER / "install-layer.sh", CONTAINER / "relock.sh"]:
        assert os.access(path, os.X_OK), f"{path.relative_to(REPO)} should be executable"


def test_overrides_carry_the_seeds_settings():
    overrides = json.loads((CONTAINER / "overrides.json").read_text())
    assert overrides["@jupyterlab/apputils-extension:themes"]["theme"] == "JupyterLab Dark"
    formatter = overrides["jupyterlab_code_formatter:settings"]
    assert formatter["formatOnSave"] is True
    assert formatter["preferences"]["default_formatter"]["python"] == ["isort", "black"]
    pylsp = overrides["@jupyter-lsp/jupyterlab-lsp:plugin"]["language_servers"]["pylsp"]["serverSettings"]
    assert pylsp["pylsp.plugins.flake8.enabled"] and pylsp["pylsp.plugins.pydocstyle.enabled"]


class _Config:
    """Stands in for traitlets' Config: attribute sections, created on first use."""

    def __getattr__(self, name):
        section = type("Section", (), {})()
        setattr(self, name, section)
        return section


def _server_config(monkeypatch, **env):
    for key in ("JUPYTER_TOKEN_FILE", "JUPYTER_PASSWORD_HASH_FILE", "WORKSPACE_DIR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = _Config()
    runpy.run_path(str(CONTAINER / "jupyter_server_config.py"), init_globals={"get_config": lambda: config})
    return config


def test_server_config_reads_the_token_file(monkeypatch, tmp_path):
    token = tmp_path / "jupyter_token"
    token.write_text("s3cret\n")
    c = _server_config(monkeypatch, JUPYTER_TOKEN_FILE=str(token))
    assert c.IdentityProvider.token == "s3cret"
    assert (c.ServerApp.root_dir, c.ServerApp.port, c.ServerApp.port_retries) == ("/workspace", 8888, 0)
    assert c.ServerApp.ip == "0.0.0.0" and c.ServerApp.open_browser is False


def test_server_config_reads_an_argon2_hash(monkeypatch, tmp_path):
    hashed = tmp_path / "hash"
    hashed.write_text("argon2:$argon2id$v=19$m=10240,t=10,p=8$c2FsdA$aGFzaA\n")
    c = _server_config(monkeypatch, JUPYTER_PASSWORD_HASH_FILE=str(hashed))
    assert c.PasswordIdentityProvider.hashed_password.startswith("argon2:$argon2id$")
    assert "IdentityProvider" not in vars(c), "no token file, so no token may be configured"


@pytest.mark.parametrize(
    ("variable", "content", "message"),
    [
        ("JUPYTER_TOKEN_FILE", None, "cannot read"),
        ("JUPYTER_TOKEN_FILE", "\n", "is empty"),
        ("JUPYTER_PASSWORD_HASH_FILE", "sha1:abc\n", "no argon2 hash"),
    ],
)
def test_server_config_stops_on_a_bad_secret(monkeypatch, tmp_path, variable, content, message):
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=message):
        _server_config(monkeypatch, **{variable: str(path)})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch"], "no profile nosuch"),
        (["pytorch", "--cuda", "12.4", "--torch-from-pypi"], "PyPI has no torch build for CUDA 12.4"),
        (["jupyter", "--bogus"], "unknown option --bogus"),
    ],
)
def test_relock_refuses_bad_requests_before_touching_the_network(args, message):
    result = subprocess.run([str(CONTAINER / "relock.sh"), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert message in result.stderr


def test_install_layer_refuses_to_run_without_the_dockerfiles_fixed_time(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("")
    env = {key: value for key, value in os.environ.items() if key != "SOURCE_DATE_EPOCH"}
    result = subprocess.run(
        ["sh", str(CONTAINER / "install-layer.sh"), str(lock)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "SOURCE_DATE_EPOCH must be set by the Dockerfile" in result.stderr


def test_relock_refuses_a_profile_with_an_unknown_torch_index(tmp_path):
    (tmp_path / "requirements").mkdir()
    (tmp_path / "requirements" / "rocm.in").write_text("# torch-index: rocm\n-r jupyter.in\ntorch\n")
    relock = tmp_path / "relock.sh"
    relock.write_bytes((CONTAINER / "relock.sh").read_bytes())
    relock.chmod(0o755)
    result = subprocess.run([str(relock), "rocm"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "relock: rocm.in says torch-index: rocm; expected cuda or cpu" in result.stderr
