"""A typed, validated, frozen view of each host's settings.

This is the only module that reads raw ``host.data``. Every host of the inventory is
validated the first time any host asks for its settings, so one bad value on one host
stops the whole run while the deploy is still being planned: before any operation
touches any host.
"""

from __future__ import annotations

import dataclasses
import difflib
import getpass
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pyinfra.api.exceptions import PyinfraError

from labfleet import checks
from labfleet.checks import Invalid

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS_DIR = REPO_ROOT / "container" / "requirements"

# The first driver release that runs each CUDA line's wheels (the floor used when
# nvidia_driver_min is not set).
CUDA_DRIVER_FLOOR = {
    "11.8": "450.80.02",
    "12.1": "525.60.13",
    "12.4": "525.60.13",
    "12.6": "525.60.13",
    "12.8": "570",
    "12.9": "570",
    "13.0": "580",
}


class SettingsError(PyinfraError):
    """One or more settings are invalid; the message has one line per problem."""


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    readonly: bool = True
    prune: bool = False
    manifest: str | None = None


@dataclass(frozen=True)
class JupyterUser:
    """One compose project: a host account, its published port and its workspace."""

    name: str
    port: int
    workspace_dir: str


@dataclass(frozen=True)
class Settings:
    host: str
    gpu: str | bool
    gpu_devices: str | int | tuple[str, ...]
    docker_source: str
    docker_apt_mirror: str
    docker_version: str | None
    docker_packages: tuple[str, ...] | None
    docker_users: tuple[str, ...]
    docker_daemon: dict
    nvidia_toolkit: str | bool
    nvidia_toolkit_apt_mirror: str
    nvidia_toolkit_apt_key: str | None
    nvidia_toolkit_version: str | None
    nvidia_default_runtime: bool
    nvidia_driver_min: str
    nvidia_driver_install: bool
    cuda: str
    datasets_root: str
    datasets: tuple[Dataset, ...]
    datasets_group: str
    lan_address: str
    lan_ssh_port: int
    workspace_dir: str
    jupyter_users: tuple[JupyterUser, ...]
    jupyter_bind: str
    jupyter_password_hash: str | None
    image_profile: str
    image_delivery: str
    image_registry: str | None
    registry_listen: str
    registry_storage: str
    base_image: str
    extra_ca_certificates: tuple[str, ...]
    shm_size: str
    ulimits: dict
    groups: tuple[str, ...] = ()

    @property
    def is_registry(self) -> bool:
        """This host is the lab's registry (inventory group `registry`)."""
        return "registry" in self.groups

    @property
    def jupyter_user(self) -> JupyterUser:
        """The first (usually the only) jupyter user."""
        return self.jupyter_users[0]


def _profiles() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in REQUIREMENTS_DIR.glob("*.in")))


# Each setting: (validator, expected form shown in errors). A validator returns the
# normalised value or raises Invalid.
FIELDS: dict[str, tuple[Any, str]] = {
    "gpu": (checks.choice("auto", True, False), 'one of "auto", true, false'),
    "gpu_devices": (checks.gpu_devices, '"all", a GPU count >= 1, or a list of device ids'),
    "docker_source": (checks.choice("docker-ce", "distro"), 'one of "docker-ce", "distro"'),
    "docker_apt_mirror": (checks.url, "an http(s):// or file:/ URL"),
    "docker_version": (checks.optional(checks.package_version), "null or a version like 5:27.3.1"),
    "docker_packages": (
        checks.optional(checks.list_of(checks.package_spec)),
        'null (the source\'s default list) or a list of package names, each optionally "name=version"',
    ),
    "docker_users": (checks.list_of(checks.username), "a list of user names"),
    "docker_daemon": (checks.json_object, "a mapping of daemon.json keys to JSON values"),
    "nvidia_toolkit": (checks.choice("auto", True, False), 'one of "auto", true, false'),
    "nvidia_toolkit_apt_mirror": (checks.url, "an http(s):// or file:/ URL"),
    "nvidia_toolkit_apt_key": (checks.optional(checks.url), "null or an http(s):// or file:/ URL"),
    "nvidia_toolkit_version": (checks.optional(checks.package_version), "null or a version like 1.17.8-1"),
    "nvidia_default_runtime": (checks.boolean, "true or false"),
    "nvidia_driver_min": (checks.optional(checks.driver_version), 'null or a driver version like "570" or "525.60.13"'),
    "nvidia_driver_install": (checks.boolean, "true or false"),
    "cuda": (checks.choice(*CUDA_DRIVER_FLOOR), "one of " + ", ".join(f'"{c}"' for c in CUDA_DRIVER_FLOOR)),
    "datasets_root": (checks.absolute_path, "an absolute path"),
    "datasets": (checks.datasets, "a mapping of dataset name to {source, readonly, prune, manifest}"),
    "datasets_group": (checks.username, "a group name like labdata"),
    "lan_address": (checks.optional(checks.host_address), "null, an IP address or a DNS name"),
    "lan_ssh_port": (checks.optional(checks.port), "null or an integer port 1-65535"),
    "workspace_dir": (checks.workspace_dir, 'an absolute path, optionally with "{user}"'),
    "jupyter_user": (checks.optional(checks.username), "null or a user name"),
    "jupyter_users": (checks.list_of(checks.jupyter_user_entry), "a list of user names or {name, port} mappings"),
    "jupyter_port": (checks.port, "an integer port 1-65535"),
    "jupyter_bind": (checks.ip_address, "an IPv4 or IPv6 address such as 127.0.0.1"),
    "jupyter_password_hash": (
        checks.optional(checks.argon2_hash),
        "null or an argon2 hash (argon2:$argon2id$v=19$m=...,t=...,p=...$salt$hash)",
    ),
    "image_profile": (checks.profile(_profiles), "a profile under container/requirements"),
    "image_delivery": (checks.choice("build", "ship", "registry"), 'one of "build", "ship", "registry"'),
    "image_registry": (checks.optional(checks.registry), "null or a registry address like registry.lab:5000"),
    "registry_listen": (checks.listen_address, 'an address and port like "0.0.0.0:5000"'),
    "registry_storage": (checks.absolute_path, "an absolute path"),
    "base_image": (checks.image_reference, "an image reference like ubuntu:24.04@sha256:<64 hex>"),
    "extra_ca_certificates": (checks.list_of(checks.pem_file), "a list of PEM certificate files on the controller"),
    "shm_size": (checks.size, 'a size like "16g", "512m" or "1073741824"'),
    "ulimits": (checks.ulimits, "a mapping of ulimit names (memlock, stack, nofile, ...) to integers, -1 = unlimited"),
}


@cache
def _connector_keys() -> frozenset[str]:
    """Data keys that pyinfra's own connectors read; they are not labfleet settings."""
    from pyinfra.api.connectors import get_all_connectors

    keys: set[str] = set()
    for connector in get_all_connectors().values():
        keys.update(getattr(connector, "data_meta", {}) or {})
    return frozenset(keys)


def _is_passthrough(key: str) -> bool:
    return key.startswith(("_", "ssh_", "winrm_")) or key in _connector_keys()


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else "; known settings are listed in group_data/all.py"


def _default_jupyter_user(raw: dict) -> str | None:
    if raw.get("ssh_user"):
        return raw["ssh_user"]
    # On @local the person who ran the command owns the notebooks, even under sudo.
    return os.environ.get("SUDO_USER") or getpass.getuser()


def build(
    host_name: str, raw: dict, inventory_hosts: frozenset[str] = frozenset(), groups: tuple[str, ...] = ()
) -> Settings:
    """Validate one host's raw data and return its Settings, or raise SettingsError."""
    errors: list[str] = []
    values: dict[str, Any] = {}

    for key in sorted(raw):
        if key not in FIELDS and not _is_passthrough(key):
            errors.append(f"host {host_name}: unknown setting {key}{_suggest(key)}")

    for key, (validate, expected) in FIELDS.items():
        if key not in raw:
            errors.append(
                f"host {host_name}: setting {key} is missing; expected {expected} (is group_data/all.py loaded?)"
            )
            continue
        try:
            values[key] = validate(raw[key])
        except Invalid as exc:
            detail = f" ({exc})" if str(exc) else ""
            errors.append(f"host {host_name}: {key} = {raw[key]!r} is invalid{detail}; expected {expected}")

    if not errors:
        errors.extend(_cross_checks(host_name, values, raw, inventory_hosts))
    if errors:
        raise SettingsError("\n".join(errors))
    return dataclasses.replace(_assemble(host_name, values, raw), groups=tuple(groups))


def _jupyter_users(values: dict, raw: dict) -> list[tuple[str, int]]:
    entries = values["jupyter_users"] or [values["jupyter_user"] or _default_jupyter_user(raw)]
    users = []
    for index, entry in enumerate(entries):
        name, port = entry if isinstance(entry, tuple) else (entry, None)
        users.append((name, port if port is not None else values["jupyter_port"] + index))
    return users


def _cross_checks(host_name: str, values: dict, raw: dict, inventory_hosts: frozenset[str]) -> list[str]:
    errors = []
    users = _jupyter_users(values, raw)
    names = [name for name, _ in users]
    ports = [port for _, port in users]
    if values["jupyter_users"] and values["jupyter_user"] and values["jupyter_user"] not in names:
        errors.append(
            f"host {host_name}: jupyter_user = {values['jupyter_user']!r} is not in jupyter_users = {names!r}; "
            "expected either jupyter_user alone or a jupyter_users list"
        )
    for name in names:
        if name == "root":
            errors.append(
                f"host {host_name}: jupyter_user = 'root' is invalid; expected a non-root account "
                "(set jupyter_user, or run the deploy as your own user with sudo)"
            )
    for name in {n for n in names if names.count(n) > 1}:
        errors.append(f"host {host_name}: jupyter_users lists {name!r} twice; expected each user once")
    for port in sorted({p for p in ports if ports.count(p) > 1}):
        clash = [n for n, p in users if p == port]
        errors.append(
            f"host {host_name}: jupyter_users = {raw.get('jupyter_users')!r} publish port {port} twice "
            f"(users {', '.join(clash)}); expected a distinct port per user (a user without one gets "
            "jupyter_port + its index)"
        )
    if values["image_delivery"] == "registry" and not values["image_registry"]:
        errors.append(
            f"host {host_name}: image_registry = None is invalid with image_delivery = 'registry'; "
            "expected a registry address like registry.lab:5000"
        )
    for dataset in values["datasets"]:
        if dataset.source.startswith("host:"):
            peer = dataset.source.split(":", 2)[1]
            if inventory_hosts and peer not in inventory_hosts:
                errors.append(
                    f"host {host_name}: datasets.{dataset.name}.source = {dataset.source!r} names an unknown host; "
                    f"expected one of the inventory's hosts: {', '.join(sorted(inventory_hosts))}"
                )
            elif peer == host_name:
                errors.append(
                    f"host {host_name}: datasets.{dataset.name}.source = {dataset.source!r} names this host itself; "
                    "expected a peer host that holds the dataset"
                )
    return errors


def _assemble(host_name: str, values: dict, raw: dict) -> Settings:
    users = tuple(
        JupyterUser(name=name, port=port, workspace_dir=values["workspace_dir"].replace("{user}", name))
        for name, port in _jupyter_users(values, raw)
    )
    return Settings(
        host=host_name,
        gpu=values["gpu"],
        gpu_devices=values["gpu_devices"],
        docker_source=values["docker_source"],
        docker_apt_mirror=values["docker_apt_mirror"],
        docker_version=values["docker_version"],
        docker_packages=values["docker_packages"],
        docker_users=tuple(values["docker_users"]),
        docker_daemon=values["docker_daemon"],
        nvidia_toolkit=values["nvidia_toolkit"],
        nvidia_toolkit_apt_mirror=values["nvidia_toolkit_apt_mirror"],
        nvidia_toolkit_apt_key=values["nvidia_toolkit_apt_key"],
        nvidia_toolkit_version=values["nvidia_toolkit_version"],
        nvidia_default_runtime=values["nvidia_default_runtime"],
        nvidia_driver_min=values["nvidia_driver_min"] or CUDA_DRIVER_FLOOR[values["cuda"]],
        nvidia_driver_install=values["nvidia_driver_install"],
        cuda=values["cuda"],
        datasets_root=values["datasets_root"],
        datasets=values["datasets"],
        datasets_group=values["datasets_group"],
        # How the other hosts reach this one (peer dataset pulls); the inventory's address
        # is the controller's view, which is usually, but not always, the same.
        lan_address=values["lan_address"] or raw.get("ssh_hostname") or host_name,
        lan_ssh_port=values["lan_ssh_port"] or (raw.get("ssh_port") if not values["lan_address"] else None) or 22,
        workspace_dir=values["workspace_dir"],
        jupyter_users=users,
        jupyter_bind=values["jupyter_bind"],
        jupyter_password_hash=values["jupyter_password_hash"],
        image_profile=values["image_profile"],
        image_delivery=values["image_delivery"],
        image_registry=values["image_registry"],
        registry_listen=values["registry_listen"],
        registry_storage=values["registry_storage"],
        base_image=values["base_image"],
        extra_ca_certificates=tuple(values["extra_ca_certificates"]),
        shm_size=values["shm_size"],
        ulimits=values["ulimits"],
    )


def validate_inventory(inventory) -> dict[str, Settings]:
    """Validate every host of the inventory; raise one SettingsError listing every problem."""
    names = frozenset(host.name for host in inventory)
    settings, errors = {}, []
    for host in inventory:
        try:
            groups = tuple(getattr(group, "name", group) for group in host.groups)
            settings[host.name] = build(host.name, host.data.dict(), names, groups)
        except SettingsError as exc:
            errors.append(str(exc))
    if errors:
        raise SettingsError("invalid settings, no host was changed:\n" + "\n".join(errors))
    return settings


def check_inventory_groups(namespace: dict[str, Any], groups: tuple[str, ...] = ()) -> None:
    """Stop with one line per problem when an inventory group is not a list of hosts.

    + namespace: the inventory file's globals()
    + groups: the group names it defines; every group_data/<group>.py is checked as well

    pyinfra takes each list or tuple of an inventory file as a group and skips any other
    value without a word, so ``workstations = "pc01"`` would deploy to nobody and exit 0.
    """
    names = set(groups) | {path.stem for path in (REPO_ROOT / "group_data").glob("*.py")} - {"all"}
    errors = []
    for name in sorted(names & set(namespace)):
        value = namespace[name]
        if not isinstance(value, (list, tuple)):
            errors.append(
                f"inventory: group {name} = {value!r} is invalid; expected a list of hosts, "
                f'e.g. {name} = ["pc01.lab", ("pc02.lab", {{"ssh_user": "admin"}})]'
            )
            continue
        for entry in value:
            named = isinstance(entry, str) and entry
            with_data = (
                isinstance(entry, tuple)
                and len(entry) == 2
                and isinstance(entry[0], str)
                and isinstance(entry[1], dict)
            )
            if not (named or with_data):
                errors.append(
                    f"inventory: group {name} has the entry {entry!r}; expected a host name or (name, {{data}})"
                )
    if errors:
        raise SettingsError("invalid inventory, no host was changed:\n" + "\n".join(errors))


_validated: dict[int, dict[str, Settings]] = {}


def for_host(host) -> Settings:
    """This host's Settings; the first call validates the whole inventory."""
    inventory = host.inventory
    key = id(inventory)
    if key not in _validated:
        _validated[key] = validate_inventory(inventory)
    return _validated[key][host.name]
