"""Every setting's validation, good and bad: each error names host, key, value and form."""

import ast
from types import SimpleNamespace

import pytest

from labfleet import model, settings
from labfleet.model import Source
from labfleet.settings import SettingsError, build, validate_inventory

REPO = model.REPO_ROOT
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

# (key, bad value, a fragment the error must contain besides host/key/value)
BAD = [
    ("gpu", "yes", 'one of "auto", true, false'),
    ("gpu", 1, 'one of "auto", true, false'),
    ("gpu_devices", 0, "at least 1"),
    ("gpu_devices", ["zero"], "device id"),
    ("gpu_devices", [], "a list of device ids"),
    ("docker_source", "apt", '"docker-ce", "distro"'),
    ("docker_apt_mirror", "ftp://mirror.lab/docker", "http(s)://"),
    ("docker_apt_mirror", "mirror.lab/docker", "http(s)://"),
    ("docker_version", "latest", "version like"),
    ("docker_version", 27, "version like"),
    ("docker_packages", "docker.io", "list of package names"),
    ("docker_packages", ["docker-ce=latest"], '"name=version"'),
    ("docker_packages", ["Docker CE"], '"name=version"'),
    ("docker_users", "alice", "list of user names"),
    ("docker_users", ["Alice Smith"], "list of user names"),
    ("docker_daemon", ["log-driver"], "daemon.json"),
    ("docker_daemon", {"x": {1, 2}}, "JSON-serialisable"),
    ("nvidia_toolkit", "yes", 'one of "auto", true, false'),
    ("nvidia_toolkit_apt_mirror", "", "URL"),
    ("nvidia_toolkit_apt_key", "apt.lab/nvidia/gpgkey", "http(s)://"),
    ("nvidia_toolkit_version", "1.17 8", "version like"),
    ("nvidia_toolkit_version", "1.17.7-1", "below 1.17.8: 1.17.8 is the first release with the fix for CVE-2025-23266"),
    ("nvidia_toolkit_version", "1.16.1-1", "CVE-2024-0132 was fixed in 1.16.2"),
    ("nvidia_toolkit_version", "1.17.8~rc.1-1", "below 1.17.8"),
    ("nvidia_default_runtime", "false", "true or false"),
    ("nvidia_driver_min", "57", "driver version"),
    ("nvidia_driver_min", "latest", "driver version"),
    ("nvidia_driver_version", "580", 'NVIDIA driver release like "580.95.05"'),
    ("nvidia_driver_version", "580.95.05-1", 'NVIDIA driver release like "580.95.05"'),
    ("nvidia_driver_version", 580.95, 'NVIDIA driver release like "580.95.05"'),
    ("nvidia_driver_version", "latest", 'NVIDIA driver release like "580.95.05"'),
    ("nvidia_driver_install", "no", "true or false"),
    ("cuda", "12.3", '"12.8"'),
    ("cuda", 12.8, '"12.8"'),
    ("datasets_root", "srv/datasets", "absolute path"),
    ("datasets_root", "/srv/../etc", "absolute path"),
    ("datasets_root", "/", "absolute path"),
    ("datasets", {"../x": {"source": "manual"}}, "without '/', '..' or spaces"),
    ("datasets", {"a b": {"source": "manual"}}, "without '/', '..' or spaces"),
    ("datasets", {"imagenet/train": "manual"}, "without '/', '..' or spaces"),
    ("datasets", {"imagenet": {"source": "s3:"}}, "s3:<bucket>[/<prefix>]"),
    ("datasets", {"imagenet": {"source": "ftp:bucket"}}, "local:<path>"),
    ("datasets", {"imagenet": {"source": "host:pc2:relative"}}, "host:<inventory host>"),
    ("datasets", {"imagenet": {"source": "nfs:server"}}, "nfs:<server>"),
    ("datasets", {"imagenet": {"source": "manual", "readonly": "no"}}, "true or false"),
    ("datasets", {"imagenet": {"source": "manual", "prun": True}}, "unknown keys"),
    ("datasets", {"imagenet": {}}, "has no source"),
    ("datasets", ["imagenet"], "mapping"),
    ("datasets", {"imagenet": "local:/nonexistent/imagenet"}, "not a directory on the controller"),
    ("datasets", {"imagenet": {"source": "manual", "manifest": "../SHA256SUMS"}}, "inside the dataset"),
    ("datasets", {"imagenet": {"source": "manual", "manifest": "/SHA256SUMS"}}, "inside the dataset"),
    ("datasets", {"imagenet": {"source": "nfs:nas:/export", "readonly": False}}, "mounted read-only"),
    ("datasets_group", "Lab Data", "group name"),
    ("lan_address", "pc 01", "IP address or a DNS name"),
    ("lan_address", "http://pc01", "IP address or a DNS name"),
    ("lan_ssh_port", 0, "1-65535"),
    ("dataset_fanout", 0, "integer 1-64"),
    ("dataset_fanout", "2", "integer 1-64"),
    ("dataset_fanout", True, "integer 1-64"),
    ("dataset_fanout", 65, "integer 1-64"),
    ("workspace_dir", "~/workspace", "absolute path"),
    ("workspace_dir", "/srv/{host}/ws", "{user}"),
    ("jupyter_user", "Alice", "user name"),
    ("jupyter_user", "al ice", "user name"),
    ("jupyter_users", ["alice", {"name": "bob", "port": 0}], "{name, port}"),
    ("jupyter_users", "alice", "a list of user names"),
    ("jupyter_port", 0, "1-65535"),
    ("jupyter_port", 65536, "1-65535"),
    ("jupyter_port", "8888", "1-65535"),
    ("jupyter_port", True, "1-65535"),
    ("jupyter_bind", "localhost", "IPv4 or IPv6"),
    ("jupyter_bind", "127.0.0.256", "IPv4 or IPv6"),
    ("jupyter_password_hash", "sha1:abc:def", "argon2"),
    ("jupyter_password_hash", "$argon2id$v=19$m=10240,t=10,p=8$c2FsdA", "argon2"),
    ("image_profile", "tensorflow", "container/requirements"),
    ("image_delivery", "rsync", '"build", "ship", "registry"'),
    ("image_registry", "https://registry.lab:5000", "registry address"),
    ("image_registry", "registry.lab:99999", "registry address"),
    ("registry_listen", "5000", "0.0.0.0:5000"),
    ("registry_listen", "lab.local:5000", "0.0.0.0:5000"),
    ("registry_storage", "var/lib/registry", "absolute path"),
    ("base_image", "Ubuntu:24.04", "image reference"),
    ("base_image", "ubuntu:24.04@sha256:abc", "image reference"),
    ("extra_ca_certificates", ["/nonexistent/ca.crt"], "no such file"),
    ("extra_ca_certificates", "/etc/ssl/ca.crt", "list of PEM"),
    ("shm_size", "16 GB", "16g"),
    ("shm_size", "-1g", "16g"),
    ("shm_size", 0, "16g"),
    ("ulimits", {"memlock": "unlimited"}, "-1 = unlimited"),
    ("ulimits", {"memlok": -1}, "unknown ulimit"),
    ("ulimits", [("memlock", -1)], "mapping of ulimit names"),
    ("home_dir", "home/{user}", "not absolute"),
    ("home_dir", "/srv/home/{name}", "only placeholder allowed is {user}"),
    ("jupyter_env", {"WANDB-PROJECT": "lab"}, "not an environment variable name"),
    ("jupyter_env", {"HOME": "/tmp"}, "set by labfleet itself"),
    ("jupyter_env", {"SEED": [1, 2]}, "is a list; expected a string or a number"),
    ("jupyter_env", {"DEBUG": True}, "is a bool; expected a string or a number"),
    ("jupyter_env", ["SEED=1"], "mapping of environment variable names to strings or numbers"),
    ("jupyter_secrets", {"WANDB_API_KEY": "/nonexistent/wandb"}, "not a file on the controller"),
    ("jupyter_secrets", {"1PASSWORD": "/etc/hostname"}, "not an environment variable name"),
    ("jupyter_secrets", ["/etc/hostname"], "(not a mapping)"),
    ("jupyter_secrets", {"KEY": 42}, "KEY = 42 is not a file path"),
    ("jupyter_env", {"MOTD": "two\nlines"}, "MOTD contains a newline or NUL"),
    ("jupyter_users", ["alice", {"name": "bob", "home_dir": "bob"}], "user bob: home_dir 'bob' is invalid"),
    ("jupyter_users", ["alice", {"name": "bob", "env": {"A B": 1}}], "user bob: env {'A B': 1} is invalid"),
    ("jupyter_users", ["alice", {"name": "bob", "secrets": {"K": "/nonexistent"}}], "not a file on the controller"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_value_names_host_key_value_and_form(raw, key, value, expected):
    raw[key] = value
    with pytest.raises(SettingsError) as err:
        build("pc07", raw)
    message = str(err.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"host pc07: {key} = {value!r} is invalid"), message
    assert expected in message


GOOD = [
    ("gpu", True, True),
    ("gpu", "auto", "auto"),
    ("gpu_devices", 2, 2),
    ("gpu_devices", [0, "GPU-0a1b2c3d-0000-1111-2222-333344445555"], ("0", "GPU-0a1b2c3d-0000-1111-2222-333344445555")),
    ("docker_source", "distro", "distro"),
    ("docker_apt_mirror", "http://apt.lab/docker/", "http://apt.lab/docker"),
    ("docker_apt_mirror", "file:///srv/mirror", "file:///srv/mirror"),
    ("docker_version", "5:27.3.1-1~debian.12~bookworm", "5:27.3.1-1~debian.12~bookworm"),
    ("docker_packages", None, None),
    ("docker_packages", ["docker.io", "docker-cli"], ("docker.io", "docker-cli")),
    ("docker_packages", ["docker-ce=5:27.3.1-1~debian.13~trixie"], ("docker-ce=5:27.3.1-1~debian.13~trixie",)),
    ("docker_daemon", {"log-driver": "local", "log-opts": {"max-size": "10m"}}, None),
    ("datasets", {"mnist": {"source": "local:/", "manifest": "sums/SHA256SUMS", "prune": True}}, None),
    ("datasets", {"mnist": "nfs:nas.lab:/export/mnist"}, None),
    ("datasets_group", "researchers", "researchers"),
    ("lan_address", "10.0.0.12", "10.0.0.12"),
    ("lan_address", "pc01.lab", "pc01.lab"),
    ("lan_ssh_port", 2222, 2222),
    ("dataset_fanout", 4, 4),
    ("dataset_fanout", None, None),
    ("nvidia_driver_min", 550, "550"),
    ("nvidia_driver_install", True, True),
    ("nvidia_toolkit", True, True),
    ("nvidia_toolkit", "auto", "auto"),
    ("nvidia_toolkit_apt_key", "http://apt.lab/nvidia/gpgkey/", "http://apt.lab/nvidia/gpgkey"),
    ("nvidia_driver_min", "525.60.13", "525.60.13"),
    ("jupyter_bind", "::1", "::1"),
    ("jupyter_bind", "0.0.0.0", "0.0.0.0"),
    ("jupyter_password_hash", "$argon2id$v=19$m=10240,t=10,p=8$c2FsdHNhbHQ$aGFzaGhhc2g", None),
    ("image_registry", "registry.lab:5000", "registry.lab:5000"),
    ("registry_listen", "127.0.0.1:5000", "127.0.0.1:5000"),
    ("registry_listen", ":5000", ":5000"),
    ("base_image", "labfleet-test/debian:trixie-0123456789ab", None),
    ("base_image", "debian:trixie-slim@sha256:" + "a" * 64, None),
    ("shm_size", "512M", "512m"),
    ("shm_size", 1073741824, "1073741824"),
    ("ulimits", {"memlock": 8388608, "stack": 67108864, "nofile": 65536}, None),
]


@pytest.mark.parametrize(("key", "value", "normalised"), GOOD, ids=[f"{k}={v!r}" for k, v, _ in GOOD])
def test_good_value_is_accepted(raw, key, value, normalised):
    raw[key] = value
    result = build("pc07", raw)
    if key in settings.Settings.__dataclass_fields__ and normalised is not None:
        assert getattr(result, key) == normalised


def test_defaults_are_valid(raw):
    s = build("pc01", raw)
    assert s.cuda == "12.8"
    assert s.nvidia_driver_min == "525.60.13"
    assert s.jupyter_user.name == "alice"
    assert s.jupyter_user.port == 8888
    assert s.jupyter_user.workspace_dir == "/srv/workspace/alice"


def test_driver_floor_follows_cuda(raw):
    raw["cuda"] = "13.0"
    assert build("pc01", raw).nvidia_driver_min == "580.65.06"
    # jupyter's one lock serves every CUDA line; pytorch has none for 12.4.
    raw["image_profile"] = "jupyter"
    raw["cuda"] = "12.4"
    assert build("pc01", raw).nvidia_driver_min == "525.60.13"
    raw["nvidia_driver_min"] = "560"
    assert build("pc01", raw).nvidia_driver_min == "560"


def test_password_hash_gets_jupyter_prefix(raw):
    raw["jupyter_password_hash"] = "$argon2id$v=19$m=10240,t=10,p=8$c2FsdHNhbHQ$aGFzaGhhc2g"
    assert build("pc01", raw).jupyter_password_hash.startswith("argon2:$argon2id$")


def test_unknown_key_suggests_the_closest(raw):
    raw["jupyter_prot"] = 8890
    with pytest.raises(SettingsError, match=r"host pc01: unknown setting jupyter_prot; did you mean jupyter_port\?"):
        build("pc01", raw)


def test_unknown_key_without_a_close_match(raw):
    raw["colour"] = "blue"
    with pytest.raises(SettingsError, match=r"unknown setting colour; known settings are listed in group_data/all\.py"):
        build("pc01", raw)


def test_connector_and_private_keys_pass_through(raw):
    raw.update(ssh_user="admin", ssh_port=2222, _sudo=True, docker_identifier="x", winrm_port=5986)
    assert build("pc01", raw).jupyter_user.name == "alice"


def test_jupyter_user_defaults_to_ssh_user(raw):
    raw["jupyter_user"] = None
    raw["ssh_user"] = "bob"
    assert build("pc01", raw).jupyter_user.name == "bob"


def test_root_is_refused_as_jupyter_user(raw):
    raw["jupyter_user"] = "root"
    with pytest.raises(SettingsError, match="host pc01: jupyter_user = 'root' is invalid; expected a non-root account"):
        build("pc01", raw)


def test_several_users_get_consecutive_ports(raw):
    raw["jupyter_user"] = None
    raw["jupyter_users"] = ["alice", "bob", {"name": "carol", "port": 9000}]
    users = build("pc01", raw).jupyter_users
    assert [(u.name, u.port, u.workspace_dir) for u in users] == [
        ("alice", 8888, "/srv/workspace/alice"),
        ("bob", 8889, "/srv/workspace/bob"),
        ("carol", 9000, "/srv/workspace/carol"),
    ]


def test_clashing_ports_on_one_host(raw):
    raw["jupyter_user"] = None
    raw["jupyter_users"] = ["alice", {"name": "bob", "port": 8888}]
    with pytest.raises(
        SettingsError, match=r"host pc01: jupyter_users = .* publish port 8888 twice \(users alice, bob\)"
    ):
        build("pc01", raw)


def test_same_user_twice(raw):
    raw["jupyter_user"] = None
    raw["jupyter_users"] = ["alice", "alice"]
    with pytest.raises(SettingsError, match="jupyter_users lists 'alice' twice"):
        build("pc01", raw)


def test_registry_delivery_needs_a_registry(raw):
    raw["image_delivery"] = "registry"
    with pytest.raises(SettingsError, match="image_registry = None is invalid with image_delivery = 'registry'"):
        build("pc01", raw)


def test_peer_dataset_must_name_an_inventory_host(raw):
    raw["datasets"] = {"imagenet": {"source": "host:pc09:/srv/datasets/imagenet"}}
    with pytest.raises(SettingsError, match="names an unknown host; expected one of the inventory's hosts: pc01, pc02"):
        build("pc01", raw, frozenset({"pc01", "pc02"}))
    raw["datasets"] = {"imagenet": {"source": "host:pc01:/srv/datasets/imagenet"}}
    with pytest.raises(SettingsError, match="names this host itself"):
        build("pc01", raw, frozenset({"pc01", "pc02"}))
    raw["datasets"] = {"imagenet": {"source": "host:pc02:/srv/datasets/imagenet", "readonly": False}}
    (dataset,) = build("pc01", raw, frozenset({"pc01", "pc02"})).datasets
    assert (dataset.name, dataset.readonly, dataset.prune) == ("imagenet", False, False)


def test_missing_default_is_reported(raw):
    del raw["shm_size"]
    with pytest.raises(SettingsError, match="setting shm_size is missing"):
        build("pc01", raw)


def test_extra_ca_certificates_must_be_pem(raw, tmp_path):
    good, bad = tmp_path / "lab-ca.crt", tmp_path / "notes.txt"
    good.write_text(PEM)
    bad.write_text("hello")
    raw["extra_ca_certificates"] = [str(good)]
    assert build("pc01", raw).extra_ca_certificates == (str(good),)
    raw["extra_ca_certificates"] = [str(good), str(bad)]
    with pytest.raises(SettingsError, match=r"item 1 .*not a PEM certificate"):
        build("pc01", raw)


def test_settings_are_frozen(raw):
    s = build("pc01", raw)
    with pytest.raises(AttributeError):
        s.cuda = "13.0"


def _fake_inventory(hosts: dict[str, dict]):
    return [
        SimpleNamespace(name=name, groups=["lab"], data=SimpleNamespace(dict=lambda d=data: d))
        for name, data in hosts.items()
    ]


def test_inventory_validation_reports_every_bad_host_and_only_those(raw):
    bad_port = {**raw, "jupyter_port": 70000}
    bad_bind = {**raw, "jupyter_bind": "lab.local"}
    inventory = _fake_inventory({"pc01": raw, "pc02": bad_port, "pc03": raw, "pc04": bad_bind})
    with pytest.raises(SettingsError) as err:
        validate_inventory(inventory)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid settings, no host was changed:"
    assert lines[1:] == [
        "host pc02: jupyter_port = 70000 is invalid; expected an integer port 1-65535",
        "host pc04: jupyter_bind = 'lab.local' is invalid; expected an IPv4 or IPv6 address such as 127.0.0.1",
    ]


def test_inventory_validation_returns_settings_per_host(raw):
    inventory = _fake_inventory({"pc01": raw, "pc02": {**raw, "jupyter_port": 9999}})
    result = validate_inventory(inventory)
    assert result["pc02"].jupyter_user.port == 9999
    assert result["pc01"].jupyter_user.port == 8888


def _all_py_settings() -> dict[str, int]:
    """group_data/all.py's settings -> the line each is assigned on."""
    tree = ast.parse((REPO / "group_data" / "all.py").read_text())
    return {
        target.id: node.lineno
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def test_group_data_all_and_the_declarations_list_the_same_keys():
    written = set(_all_py_settings())
    declared = set(model.declarations())
    assert written - declared == set(), "in group_data/all.py but not declared in labfleet/model.py"
    assert declared - written == set(), "declared in labfleet/model.py but without a default in group_data/all.py"
    assert model.declarations() == settings.FIELDS


def test_every_setting_in_group_data_all_has_a_comment_above_it():
    lines = (REPO / "group_data" / "all.py").read_text().splitlines()
    for key, lineno in _all_py_settings().items():
        above = lines[lineno - 2].strip()
        assert above.startswith("# ") and len(above) > 4, f"group_data/all.py: {key} has no comment above it"


def test_every_declared_field_is_a_settings_attribute_or_input_only():
    fields = {f.name for f in model.dataclasses.fields(model.Settings)}
    for key in model.declarations():
        assert key in fields or key in model.INPUT_ONLY, key
    assert not set(model.INPUT_ONLY) & fields


def test_model_imports_nothing_from_labfleet():
    tree = ast.parse((REPO / "labfleet" / "model.py").read_text())
    imported = [
        name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])
    ]
    assert not [name for name in imported if name.startswith("labfleet")], imported


def test_no_import_inside_a_function_in_checks_or_settings():
    for module in ("checks", "settings", "model"):
        tree = ast.parse((REPO / "labfleet" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not [n for n in inner if (getattr(n, "module", "") or "").startswith("labfleet")], (
                    f"labfleet/{module}.py: {node.name} imports from labfleet inside the function"
                )


@pytest.mark.parametrize(
    ("profile", "cuda", "expected"),
    [
        (
            "pytorch",
            "12.4",
            'expected one of "12.6", "12.8", "13.0", or lock it with container/relock.sh pytorch --cuda 12.4',
        ),
        ("pytorch", "12.9", "no container/requirements/pytorch-cu129.txt or pytorch.txt"),
        ("cpu", "12.8", "expected a CUDA line it is locked for (none yet), or lock it with container/relock.sh cpu"),
    ],
)
def test_cuda_without_a_lock_for_the_profile_stops_before_any_host(raw, profile, cuda, expected):
    raw.update(image_profile=profile, cuda=cuda)
    with pytest.raises(SettingsError) as err:
        validate_inventory(_fake_inventory({"pc01": raw}))
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid settings, no host was changed:"
    assert len(lines) == 2, lines
    assert lines[1].startswith(f"host pc01: cuda = {cuda!r} is invalid: image_profile {profile!r} has no lock"), lines
    assert expected in lines[1]


def test_every_cuda_with_a_lock_passes(raw):
    for profile in ("pytorch", "jupyter"):
        for cuda in model.locked_cudas(profile):
            assert build("pc01", {**raw, "image_profile": profile, "cuda": cuda}).cuda == cuda
    assert model.locked_cudas("pytorch") == ("12.6", "12.8", "13.0")
    assert model.locked_cudas("jupyter") == tuple(model.CUDA_DRIVER_FLOOR)


SOURCES = [
    ("manual", Source("manual", "manual")),
    (
        "host:pc02:/srv/datasets/coco",
        Source("host", "host:pc02:/srv/datasets/coco", path="/srv/datasets/coco", peer="pc02"),
    ),
    ("nfs:nas.lab:/export/coco", Source("nfs", "nfs:nas.lab:/export/coco", server="nas.lab", export="/export/coco")),
]


@pytest.mark.parametrize(("text", "parsed"), SOURCES, ids=[text for text, _ in SOURCES])
def test_dataset_source_is_parsed_once(raw, text, parsed):
    raw["datasets"] = {"coco": text}
    (dataset,) = build("pc01", raw, frozenset({"pc01", "pc02"})).datasets
    assert dataset.source == parsed
    assert str(dataset.source) == text


def test_local_source_is_resolved_on_the_controller(raw, tmp_path):
    (tmp_path / "coco").mkdir()
    raw["datasets"] = {"coco": {"source": f"local:{tmp_path}/./coco", "readonly": False}}
    (dataset,) = build("pc01", raw).datasets
    resolved = str((tmp_path / "coco").resolve())
    assert dataset.source == Source("local", f"local:{resolved}", path=resolved)
    assert (dataset.readonly, str(dataset.source)) == (False, f"local:{resolved}")


def test_home_without_user_is_refused_for_several_users(raw):
    raw["jupyter_user"] = None
    raw["jupyter_users"] = ["alice", "bob"]
    raw["home_dir"] = "/srv/home"
    with pytest.raises(SettingsError) as err:
        build("pc01", raw)
    assert str(err.value) == (
        "host pc01: home_dir = '/srv/home' has no {user} while users alice, bob use it; "
        'expected a path with "{user}" such as "/srv/home/{user}", or a home_dir per user in jupyter_users'
    )


def test_a_single_user_may_have_a_home_without_user(raw):
    raw["home_dir"] = "/home/alice-lab"
    assert build("pc01", raw).jupyter_user.home_dir == "/home/alice-lab"


def test_two_users_sharing_one_home_are_refused(raw):
    raw["jupyter_user"] = None
    raw["jupyter_users"] = ["alice", {"name": "bob", "home_dir": "/srv/home/alice"}]
    with pytest.raises(SettingsError) as err:
        build("pc01", raw)
    assert str(err.value) == (
        "host pc01: users alice, bob share the home '/srv/home/alice'; expected one home per user "
        "(home_dir with {user}, or its own home_dir in each jupyter_users entry)"
    )


def test_home_on_the_workspace_is_refused(raw):
    raw["home_dir"] = "/srv/workspace/{user}"
    with pytest.raises(SettingsError, match="home_dir of alice is '/srv/workspace/alice', the same directory as"):
        build("pc01", raw)


def test_a_variable_both_plain_and_secret_is_refused(raw, tmp_path):
    (tmp_path / "key").write_text("x")
    raw["jupyter_env"] = {"HF_TOKEN": "plain"}
    raw["jupyter_secrets"] = {"HF_TOKEN": str(tmp_path / "key")}
    with pytest.raises(SettingsError, match="HF_TOKEN of alice is both in jupyter_env and in jupyter_secrets"):
        build("pc01", raw)


def test_users_get_the_hosts_env_and_secrets_with_their_own_on_top(raw, tmp_path):
    for name in ("host", "bob"):
        (tmp_path / name).write_text(name)
    raw["jupyter_user"] = None
    raw["jupyter_env"] = {"A": "host", "B": 2}
    raw["jupyter_secrets"] = {"KEY": str(tmp_path / "host")}
    raw["jupyter_users"] = [
        "alice",
        {"name": "bob", "home_dir": "/data/bob-home", "env": {"A": "bob"}, "secrets": {"KEY": str(tmp_path / "bob")}},
    ]
    alice, bob = build("pc01", raw).jupyter_users
    assert (alice.home_dir, alice.env, alice.secrets) == (
        "/srv/home/alice",
        (("A", "host"), ("B", "2")),
        (("KEY", str(tmp_path / "host")),),
    )
    assert (bob.home_dir, bob.env, bob.secrets) == (
        "/data/bob-home",
        (("A", "bob"), ("B", "2")),
        (("KEY", str(tmp_path / "bob")),),
    )
