"""A typed, validated, frozen view of each host's settings.

This is the only module that reads raw ``host.data``. Every host of the inventory is
validated the first time any host asks for its settings, so one bad value on one host
stops the whole run while the deploy is still being planned: before any operation
touches any host.

Each setting is declared once, as a field of ``labfleet.model.Settings`` (its type, check and
expected form; see that module for how to add one); group_data/all.py holds its default.
Checks across settings, the inventory and the controller's files are in ``labfleet.checks``.
"""

from __future__ import annotations

import dataclasses
import difflib
import getpass
import os
from functools import cache
from typing import Any

from pyinfra.api.exceptions import PyinfraError

from labfleet import checks
from labfleet.model import (
    CUDA_DRIVER_FLOOR,
    REPO_ROOT,
    REQUIREMENTS_DIR,
    Dataset,
    Invalid,
    JupyterUser,
    Settings,
    Source,
    UserEntry,
    declarations,
)

# The model's names are re-exported: steps import what they read from here.
__all__ = [
    "CUDA_DRIVER_FLOOR",
    "FIELDS",
    "REPO_ROOT",
    "REQUIREMENTS_DIR",
    "Dataset",
    "JupyterUser",
    "Settings",
    "SettingsError",
    "Source",
    "build",
    "check_inventory_groups",
    "for_host",
    "validate_inventory",
]


class SettingsError(PyinfraError):
    """One or more settings are invalid; the message has one line per problem."""


# Every group_data/all.py key -> its check and expected form, as labfleet.model declares them.
FIELDS = declarations()


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

    for key, declared in FIELDS.items():
        expected = declared.expected
        if key not in raw:
            errors.append(
                f"host {host_name}: setting {key} is missing; expected {expected} (is group_data/all.py loaded?)"
            )
            continue
        try:
            values[key] = declared.check(raw[key])
        except Invalid as exc:
            detail = f" ({exc})" if str(exc) else ""
            errors.append(f"host {host_name}: {key} = {raw[key]!r} is invalid{detail}; expected {expected}")

    if not errors:
        users = _jupyter_users(values, raw)
        errors.extend(checks.jupyter_users(host_name, values, users, raw.get("jupyter_users")))
        errors.extend(checks.homes_and_environment(host_name, values, _user_entries(values, raw)))
        errors.extend(checks.image(host_name, values))
        errors.extend(checks.nvidia_driver(host_name, values))
        errors.extend(checks.peer_datasets(host_name, values["datasets"], inventory_hosts))
        errors.extend(checks.migration(host_name, values, inventory_hosts))
        errors.extend(checks.backups(host_name, values))
    if errors:
        raise SettingsError("\n".join(errors))
    return _assemble(host_name, values, raw, tuple(groups))


def _user_entries(values: dict, raw: dict) -> list[UserEntry]:
    if values["jupyter_users"]:
        return list(values["jupyter_users"])
    return [UserEntry(str(values["jupyter_user"] or _default_jupyter_user(raw)))]


def _jupyter_users(values: dict, raw: dict) -> list[tuple[str, int]]:
    users = []
    for index, entry in enumerate(_user_entries(values, raw)):
        users.append((entry.name, entry.port if entry.port is not None else values["jupyter_port"] + index))
    return users


def _jupyter_user(values: dict, entry: UserEntry, port: int) -> JupyterUser:
    """The user's project: the host's home_dir, jupyter_env and jupyter_secrets, with the entry's own on top."""
    return JupyterUser(
        name=entry.name,
        port=port,
        workspace_dir=values["workspace_dir"].replace("{user}", entry.name),
        home_dir=(entry.home_dir or values["home_dir"]).replace("{user}", entry.name),
        env=tuple(sorted({**dict(values["jupyter_env"]), **dict(entry.env)}.items())),
        secrets=tuple(sorted({**dict(values["jupyter_secrets"]), **dict(entry.secrets)}.items())),
    )


def _assemble(host_name: str, values: dict, raw: dict, groups: tuple[str, ...]) -> Settings:
    """The Settings: every declared field as checked, with the derived defaults filled in."""
    derived = {
        "nvidia_driver_min": values["nvidia_driver_min"] or CUDA_DRIVER_FLOOR[values["cuda"]],
        # How the other hosts reach this one (peer dataset pulls); the inventory's address
        # is the controller's view, which is usually, but not always, the same.
        "lan_address": values["lan_address"] or raw.get("ssh_hostname") or host_name,
        "lan_ssh_port": values["lan_ssh_port"] or (raw.get("ssh_port") if not values["lan_address"] else None) or 22,
        "jupyter_users": tuple(
            _jupyter_user(values, entry, port)
            for entry, (_, port) in zip(_user_entries(values, raw), _jupyter_users(values, raw), strict=True)
        ),
    }
    fields = {f.name for f in dataclasses.fields(Settings)} - {"host", "groups"}
    return Settings(host=host_name, groups=groups, **{name: derived.get(name, values[name]) for name in fields})


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
