"""Bad input never touches a host: malformed settings and inventories through the real CLI.

Each case runs `pyinfra <inventory> deploy.py` against the same two real hosts. The bad value
sits on the second host (BAD) unless the case says otherwise. Every case must end with a
non-zero exit, one line that names the host and the key, no traceback, no operation started,
and both hosts exactly as they were: a checksum snapshot of every path labfleet manages is
taken before and after.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .harness.runner import REPO_ROOT, _pyinfra_command, run_pyinfra
from .harness.snapshots import checksum_snapshot, diff_snapshots

MANAGED = ["/opt/labfleet", "/srv", "/etc/docker", "/etc/apt", "/usr/local/share/ca-certificates"]
BAD = "{bad}"  # replaced by the name of the host that carries the bad value
GOOD = "{good}"


@dataclass(frozen=True)
class Case:
    """Settings for BAD (and, with every_host, for both hosts) and what the error line holds."""

    id: str
    settings: dict
    expect: tuple[str, ...]
    every_host: bool = False
    args: tuple[str, ...] = field(default=())


def case(id: str, settings: dict, *expect: str, every_host: bool = False, args: tuple[str, ...] = ()) -> Case:
    return Case(id, settings, expect, every_host, args)


ARGON2_OK = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA"

# fmt: off
CASES = [
    # Wrong types and values, one key at a time.
    case("gpu-word", {"gpu": "yes"}, "gpu = 'yes' is invalid", 'expected one of "auto", true, false'),
    case("gpu-int", {"gpu": 1}, "gpu = 1 is invalid"),
    case("gpu-devices-zero", {"gpu_devices": 0}, "gpu_devices = 0 is invalid", "at least 1"),
    case("gpu-devices-bad-id", {"gpu_devices": ["GPU-xyz"]}, "gpu_devices = ['GPU-xyz'] is invalid"),
    case("docker-source", {"docker_source": "docker"}, "docker_source = 'docker' is invalid"),
    case("docker-mirror-ftp", {"docker_apt_mirror": "ftp://mirror.lab/docker"}, "docker_apt_mirror = 'ftp://"),
    case("docker-mirror-no-scheme", {"docker_apt_mirror": "mirror.lab/docker"}, "docker_apt_mirror = 'mirror.lab"),
    case("docker-version-int", {"docker_version": 27}, "docker_version = 27 is invalid"),
    case("docker-packages-string", {"docker_packages": "docker.io"}, "docker_packages = 'docker.io' is invalid"),
    case("docker-users-upper", {"docker_users": ["Alice"]}, "docker_users = ['Alice'] is invalid"),
    case("docker-users-string", {"docker_users": "alice"}, "docker_users = 'alice' is invalid", "not a list"),
    case("docker-daemon-list", {"docker_daemon": ["log-driver"]}, "docker_daemon = ['log-driver'] is invalid"),
    case("toolkit-word", {"nvidia_toolkit": "auto-detect"}, "nvidia_toolkit = 'auto-detect' is invalid"),
    case("toolkit-key-url", {"nvidia_toolkit_apt_key": "gpgkey"}, "nvidia_toolkit_apt_key = 'gpgkey' is invalid"),
    case("toolkit-version", {"nvidia_toolkit_version": "latest"}, "nvidia_toolkit_version = 'latest' is invalid"),
    case("toolkit-cve", {"nvidia_toolkit_version": "1.17.7"}, "nvidia_toolkit_version = '1.17.7'", "CVE-2025-23266"),
    case("default-runtime-string", {"nvidia_default_runtime": "true"}, "nvidia_default_runtime = 'true' is invalid"),
    case("driver-min-word", {"nvidia_driver_min": "newest"}, "nvidia_driver_min = 'newest' is invalid"),
    case("driver-version-branch", {"nvidia_driver_version": "580"}, "nvidia_driver_version = '580' is invalid",
         'expected null or an NVIDIA driver release like "580.95.05"'),
    case("driver-version-no-install", {"nvidia_driver_version": "580.95.05"},
         "nvidia_driver_version = '580.95.05' is invalid without nvidia_driver_install = true"),
    case("cuda-unknown", {"cuda": "12.3"}, "cuda = '12.3' is invalid"),
    case("cuda-float", {"cuda": 12.8}, "cuda = 12.8 is invalid"),
    # Paths.
    case("datasets-root-relative", {"datasets_root": "srv/datasets"}, "datasets_root = 'srv/datasets' is invalid"),
    case("datasets-root-dotdot", {"datasets_root": "/srv/../etc"}, "datasets_root = '/srv/../etc' is invalid"),
    case("datasets-root-slash", {"datasets_root": "/"}, "datasets_root = '/' is invalid", "root directory"),
    case("workspace-placeholder", {"workspace_dir": "/srv/{username}"}, "workspace_dir = '/srv/{username}'"),
    case("workspace-relative", {"workspace_dir": "workspace/{user}"}, "workspace_dir = 'workspace/{user}'"),
    case("registry-storage", {"registry_storage": "registry"}, "registry_storage = 'registry' is invalid"),
    case("ca-missing", {"extra_ca_certificates": ["/nonexistent/lab-ca.crt"]}, "extra_ca_certificates = "),
    case("ca-not-pem", {"extra_ca_certificates": ["{not_pem}"]}, "extra_ca_certificates = ", "not a PEM"),
    # Datasets.
    case("datasets-list", {"datasets": ["imagenet"]}, "datasets = ['imagenet'] is invalid", "not a mapping"),
    case("dataset-name-space", {"datasets": {"image net": "manual"}}, "datasets = {'image net'", "dataset name"),
    case("dataset-source-s3", {"datasets": {"imagenet": "s3://bucket/imagenet"}}, "datasets = ", "source 's3://"),
    case("dataset-no-source", {"datasets": {"imagenet": {"readonly": True}}}, "datasets = ", "has no source"),
    case("dataset-readonly-word", {"datasets": {"imagenet": {"source": "manual", "readonly": "no"}}},
         "datasets = ", "readonly and prune must be true or false"),
    case("dataset-unknown-key", {"datasets": {"imagenet": {"source": "manual", "readonly_": False}}},
         "datasets = ", "unknown keys ['readonly_']"),
    case("dataset-local-missing", {"datasets": {"imagenet": "local:/nonexistent/imagenet"}},
         "datasets = ", "not a directory on the controller"),
    case("dataset-peer-unknown", {"datasets": {"imagenet": "host:pc99:/srv/datasets/imagenet"}},
         "datasets.imagenet.source = 'host:pc99:/srv/datasets/imagenet' names an unknown host"),
    case("dataset-peer-self", {"datasets": {"imagenet": "host:{bad}:/srv/datasets/imagenet"}},
         "datasets.imagenet.source = 'host:{bad}:/srv/datasets/imagenet' names this host itself"),
    case("dataset-nfs-writable", {"datasets": {"imagenet": {"source": "nfs:nas:/export", "readonly": False}}},
         "datasets = ", "nfs: source is mounted read-only"),
    case("dataset-manifest-absolute", {"datasets": {"imagenet": {"source": "manual", "manifest": "/SHA256SUMS"}}},
         "datasets = ", "must be a path inside the dataset"),
    case("datasets-group", {"datasets_group": "Lab Data"}, "datasets_group = 'Lab Data' is invalid"),
    # Jupyter users and ports.
    case("user-root", {"jupyter_user": "root"}, "jupyter_user = 'root' is invalid", "non-root"),
    case("user-spaces", {"jupyter_user": "lab user"}, "jupyter_user = 'lab user' is invalid"),
    case("users-duplicate", {"jupyter_users": ["lab", "lab"]}, "jupyter_users lists 'lab' twice"),
    case("users-port-clash", {"jupyter_users": [{"name": "lab", "port": 8888}, {"name": "ann", "port": 8888}]},
         "port 8888", "jupyter_users"),
    case("users-port-clash-default", {"jupyter_users": [{"name": "lab", "port": 8889}, "ann"]},
         "port 8889", "jupyter_users"),
    case("user-and-users", {"jupyter_user": "ann", "jupyter_users": ["lab"]},
         "jupyter_user = 'ann' is not in jupyter_users"),
    case("users-entry-keys", {"jupyter_users": [{"user": "lab"}]}, "jupyter_users = [{'user': 'lab'}] is invalid"),
    case("port-range", {"jupyter_port": 70000}, "jupyter_port = 70000 is invalid", "1-65535"),
    case("port-string", {"jupyter_port": "8888"}, "jupyter_port = '8888' is invalid"),
    case("port-bool", {"jupyter_port": True}, "jupyter_port = True is invalid"),
    case("bind-name", {"jupyter_bind": "localhost"}, "jupyter_bind = 'localhost' is invalid"),
    case("bind-octets", {"jupyter_bind": "999.1.1.1"}, "jupyter_bind = '999.1.1.1' is invalid"),
    case("password-plain", {"jupyter_password_hash": "secret"}, "jupyter_password_hash = 'secret' is invalid"),
    case("password-sha1", {"jupyter_password_hash": "sha1:0a1b:2c3d"}, "jupyter_password_hash = 'sha1:"),
    # The persistent home, the environment and secrets.
    case("home-relative", {"home_dir": "home/{user}"}, "home_dir = 'home/{user}' is invalid", "not absolute"),
    case("home-without-user", {"home_dir": "/srv/home", "jupyter_users": ["lab", "ann"]},
         "home_dir = '/srv/home' has no {user} while users lab, ann use it"),
    case("home-shared", {"jupyter_users": ["lab", {"name": "ann", "home_dir": "/srv/home/lab"}]},
         "users lab, ann share the home '/srv/home/lab'"),
    case("secret-missing", {"jupyter_secrets": {"WANDB_API_KEY": "/nonexistent/wandb"}},
         "jupyter_secrets = {'WANDB_API_KEY': '/nonexistent/wandb'} is invalid", "not a file on the controller"),
    case("secret-name", {"jupyter_secrets": {"wandb-key": "/etc/hostname"}},
         "jupyter_secrets = {'wandb-key'", "not an environment variable name"),
    case("env-list-value", {"jupyter_env": {"SEEDS": [1, 2]}}, "jupyter_env = {'SEEDS': [1, 2]} is invalid",
         "expected a string or a number"),
    case("env-bool-value", {"jupyter_env": {"DEBUG": True}}, "jupyter_env = {'DEBUG': True} is invalid",
         "is a bool; expected a string or a number"),
    # Updates that wait for idle work.
    case("update-unknown", {"jupyter_update": "later"}, "jupyter_update = 'later' is invalid",
         'expected one of "when-idle", "now"'),
    case("update-idle-words", {"jupyter_update_idle": "30 minutes"}, "jupyter_update_idle = '30 minutes' is invalid",
         'expected a duration like "30m"'),
    case("cull-idle-words", {"jupyter_cull_idle": "1 day"}, "jupyter_cull_idle = '1 day' is invalid",
         'expected "off" or a duration like "30m", "12h" or "2d"'),
    # Image and registry.
    case("profile-unknown", {"image_profile": "tensorflow"}, "image_profile = 'tensorflow' is invalid"),
    case("delivery-unknown", {"image_delivery": "rsync"}, "image_delivery = 'rsync' is invalid"),
    case("registry-without-address", {"image_delivery": "registry", "image_registry": None}, "image_registry = None"),
    case("registry-scheme", {"image_registry": "http://registry.lab:5000"}, "image_registry = 'http://"),
    case("registry-port", {"image_registry": "registry.lab:99999"}, "image_registry = 'registry.lab:99999'"),
    case("registry-listen", {"registry_listen": "0.0.0.0"}, "registry_listen = '0.0.0.0' is invalid"),
    case("base-image-upper", {"base_image": "Ubuntu:24.04"}, "base_image = 'Ubuntu:24.04' is invalid"),
    case("shm-size-words", {"shm_size": "16 GB"}, "shm_size = '16 GB' is invalid"),
    case("shm-size-zero", {"shm_size": 0}, "shm_size = 0 is invalid"),
    case("ulimits-typo", {"ulimits": {"memlok": -1}}, "ulimits = {'memlok': -1} is invalid", "unknown ulimit"),
    case("ulimits-word", {"ulimits": {"memlock": "unlimited"}}, "ulimits = {'memlock': 'unlimited'} is invalid"),
    case("lan-address", {"lan_address": "pc 01"}, "lan_address = 'pc 01' is invalid"),
    case("lan-ssh-port", {"lan_ssh_port": 0}, "lan_ssh_port = 0 is invalid"),
    # Backups and restores (labfleet/backup.py).
    case("backup-repository-s3", {"backup_repository": "s3:s3.lab/restic", "backup_password_file": "/etc/hostname"},
         "backup_repository = 's3:s3.lab/restic' is invalid", "s3: repositories are not supported"),
    case("backup-repository-no-path", {"backup_repository": "sftp:backup@nas.lab",
                                       "backup_password_file": "/etc/hostname"},
         "backup_repository = 'sftp:backup@nas.lab' is invalid", "sftp: needs host:/path"),
    case("backup-password-missing", {"backup_repository": "/mnt/restic",
                                     "backup_password_file": "/nonexistent/restic-password"},
         "backup_password_file = '/nonexistent/restic-password' is invalid", "no such file on the controller"),
    case("backup-keep-list", {"backup_keep": ["daily", 7]}, "backup_keep = ['daily', 7] is invalid",
         "a mapping of counts"),
    case("backup-schedule-words", {"backup_schedule": "every night"}, "backup_schedule = 'every night' is invalid",
         "systemd calendar"),
    case("restore-from-malformed", {"restore_from": "pc03.lab"}, "restore_from = 'pc03.lab' is invalid",
         '"backup:<host>"'),
    # Replacing a PC (labfleet/migrate.py).
    case("migrate-unknown-host", {"migrate_from": "pc77.lab"}, "migrate_from = 'pc77.lab' is not in the inventory"),
    case("migrate-itself", {"migrate_from": BAD}, f"migrate_from = '{BAD}' names this host itself"),
    case("migrate-final-alone", {"migrate_final": True}, "migrate_final = True is invalid without migrate_from"),
    case("migrate-and-restore", {"migrate_from": GOOD, "restore_from": "backup", "backup_repository": "/mnt/restic",
                                 "backup_password_file": "/etc/hostname"},
         f"restore_from = 'backup' is invalid with migrate_from = '{GOOD}'"),
    # Unknown keys: typos get a suggestion.
    case("typo-port", {"jupyter_prot": 8890}, "unknown setting jupyter_prot; did you mean jupyter_port?"),
    case("typo-root", {"dataset_root": "/data"}, "unknown setting dataset_root; did you mean datasets_root?"),
    case("typo-source", {"docker_sources": "distro"}, "unknown setting docker_sources; did you mean docker_source?"),
    case("unknown-key", {"gpus": 2}, "unknown setting gpus"),
    # Every host wrong, and from the command line.
    case("every-host", {"jupyter_bind": "all"}, "jupyter_bind = 'all' is invalid", every_host=True),
    case("cli-data", {}, "jupyter_port = 'eighty' is invalid", every_host=True, args=("--data", "jupyter_port=eighty")),
]
# fmt: on


def _subst(value, names: dict[str, str]):
    if isinstance(value, str):
        for placeholder, name in names.items():
            value = value.replace(placeholder, name)
        return value
    if isinstance(value, list):
        return [_subst(item, names) for item in value]
    if isinstance(value, dict):
        return {_subst(key, names): _subst(item, names) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def pair(fleet):
    """Two bare hosts shared by every case: nothing may ever change them."""
    hosts = fleet.start_hosts(2)
    yield hosts
    if os.environ.get("LABFLEET_KEEP_HOSTS") != "1":
        fleet.remove(hosts)


@pytest.fixture(scope="module")
def not_pem(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bad-input") / "lab-ca.crt"
    path.write_text("this is not a certificate\n")
    return str(path)


def _snapshots(hosts) -> dict:
    return {host.name: checksum_snapshot(host, MANAGED, missing_ok=True) for host in hosts}


def assert_refused(output: str, rc: int, expect: tuple[str, ...], host: str | None) -> None:
    """Non-zero exit, no traceback, no operation, and one line that holds every expected part."""
    assert rc != 0, f"pyinfra exited 0 on bad input:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert "Starting operation" not in output, output[-3000:]
    wanted = ([f"host {host}:"] if host else []) + list(expect)
    lines = [line for line in output.splitlines() if all(part in line for part in wanted)]
    assert len(lines) == 1, f"expected one line with {wanted}; output tail:\n{output[-3000:]}"


@pytest.mark.parametrize("bad_case", CASES, ids=[c.id for c in CASES])
def test_bad_setting_is_refused_and_no_host_is_touched(pair, lab_data, not_pem, bad_case):
    good, bad = pair
    names = {BAD: bad.name, GOOD: good.name, "{not_pem}": not_pem}
    settings = _subst(bad_case.settings, names)
    expect = tuple(_subst(part, names) for part in bad_case.expect)
    before = _snapshots(pair)

    host_data = {host.name: settings for host in pair} if bad_case.every_host else {bad.name: settings}
    result = run_pyinfra(pair, data=lab_data, host_data=host_data, args=bad_case.args, expect_fail=True)
    output = result.stdout + result.stderr
    assert_refused(output, result.rc, expect, bad.name)
    if not bad_case.every_host:
        assert f"host {good.name}:" not in output, f"the good host {good.name} was blamed"
    else:
        assert_refused(output, result.rc, expect, good.name)

    after = _snapshots(pair)
    for host in pair:
        diff = diff_snapshots(before[host.name], after[host.name])
        assert not diff, f"{host.name} was changed by bad input:\n{diff.describe()}"


def _run_cli(inventory: Path, cwd: Path) -> tuple[int, str]:
    command = [*_pyinfra_command(), "-y", str(inventory), str(REPO_ROOT / "deploy.py")]
    completed = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    return completed.returncode, completed.stdout + completed.stderr


def test_an_inventory_with_a_syntax_error_is_refused(pair, tmp_path):
    inventory = tmp_path / "inventory.py"
    inventory.write_text(f'lab_hosts = [\n    "{pair[0].name}",\n')
    before = _snapshots(pair)
    # From a scratch directory: pyinfra writes its debug log into the working directory.
    rc, output = _run_cli(inventory, cwd=tmp_path)
    assert rc != 0
    assert f'File "{inventory}", line 1' in output and "SyntaxError" in output, output
    assert "Traceback (most recent call last)" not in output and "Starting operation" not in output
    assert _snapshots(pair) == before


@pytest.mark.parametrize(
    ("group", "value", "expect"),
    [
        ("workstations", '"{host}"', "inventory: group workstations = '{host}' is invalid; expected a list of hosts"),
        ("workstations", '{{"{host}": {{}}}}', "inventory: group workstations = {{'{host}': {{}}}} is invalid"),
        ("gpu", "1", "inventory: group gpu = 1 is invalid; expected a list of hosts"),
        ("registry", '[("{host}",)]', "inventory: group registry has the entry ('{host}',); expected a host name"),
    ],
    ids=["string", "mapping", "number", "bad-entry"],
)
def test_an_inventory_group_that_is_not_a_list_of_hosts_is_refused(pair, tmp_path, group, value, expect):
    host = pair[0].name
    product = (REPO_ROOT / "inventory.py").read_text()
    assert f"\n{group} = []\n" in product
    inventory = tmp_path / "inventory.py"
    inventory.write_text(product.replace(f"\n{group} = []\n", f"\n{group} = {value.format(host=host)}\n"))
    before = _snapshots(pair)
    rc, output = _run_cli(inventory, cwd=REPO_ROOT)
    assert_refused(output, rc, (expect.format(host=host),), None)
    assert _snapshots(pair) == before
