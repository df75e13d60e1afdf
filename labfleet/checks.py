"""Checks that relate one host's settings to each other, to the inventory and to the controller's files.

Each value has already passed its own check (labfleet.model); these find the combinations
that no single value shows, before any host is touched. Each returns one line per problem,
naming the host, the key, the value and what to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from labfleet.model import CUDA_DRIVER_FLOOR, Dataset, UserEntry, lock_file, locked_cudas, release_key


def jupyter_users(host_name: str, values: dict[str, Any], users: Sequence[tuple[str, int]], written: Any) -> list[str]:
    """+ users: (name, port) of each user, ports completed; + written: jupyter_users as the data has it."""
    errors = []
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
            f"host {host_name}: jupyter_users = {written!r} publish port {port} twice "
            f"(users {', '.join(clash)}); expected a distinct port per user (a user without one gets "
            "jupyter_port + its index)"
        )
    return errors


def homes_and_environment(host_name: str, values: dict[str, Any], entries: Sequence[UserEntry]) -> list[str]:
    """Each user's HOME is their own, and no variable is both plain and secret."""
    errors = []
    home = values["home_dir"]
    shared = [entry.name for entry in entries if entry.home_dir is None]
    if len(shared) > 1 and "{user}" not in home:
        errors.append(
            f"host {host_name}: home_dir = {home!r} has no {{user}} while users {', '.join(shared)} use it; "
            'expected a path with "{user}" such as "/srv/home/{user}", or a home_dir per user in jupyter_users'
        )
    homes: dict[str, list[str]] = {}
    for entry in entries:
        path = (entry.home_dir or home).replace("{user}", entry.name)
        homes.setdefault(path, []).append(entry.name)
        workspace = values["workspace_dir"].replace("{user}", entry.name)
        if path == workspace:
            errors.append(
                f"host {host_name}: home_dir of {entry.name} is {path!r}, the same directory as its workspace_dir; "
                "expected a separate directory such as /srv/home/{user}"
            )
        plain = dict(values["jupyter_env"]) | dict(entry.env)
        secret = dict(values["jupyter_secrets"]) | dict(entry.secrets)
        for name in sorted(set(plain) & set(secret)):
            errors.append(
                f"host {host_name}: {name} of {entry.name} is both in jupyter_env and in jupyter_secrets; "
                "expected it in one of them (a secret, if its value must stay hidden)"
            )
    if not errors:
        for path, names in homes.items():
            if len(names) > 1:
                errors.append(
                    f"host {host_name}: users {', '.join(names)} share the home {path!r}; "
                    "expected one home per user (home_dir with {user}, or its own home_dir in each jupyter_users entry)"
                )
    return errors


def image(host_name: str, values: dict[str, Any]) -> list[str]:
    errors = []
    if values["image_delivery"] == "registry" and not values["image_registry"]:
        errors.append(
            f"host {host_name}: image_registry = None is invalid with image_delivery = 'registry'; "
            "expected a registry address like registry.lab:5000"
        )
    profile, cuda = values["image_profile"], values["cuda"]
    if lock_file(profile, cuda) is None:
        # The build would fail only after Docker is installed on every host; say it now.
        cudas = locked_cudas(profile)
        have = "one of " + ", ".join(f'"{c}"' for c in cudas) if cudas else "a CUDA line it is locked for (none yet)"
        errors.append(
            f"host {host_name}: cuda = {cuda!r} is invalid: image_profile {profile!r} has no lock for it "
            f"(no container/requirements/{profile}-cu{cuda.replace('.', '')}.txt or {profile}.txt); "
            f"expected {have}, or lock it with container/relock.sh {profile} --cuda {cuda}"
        )
    return errors


def peer_datasets(host_name: str, datasets: Sequence[Dataset], inventory_hosts: frozenset[str]) -> list[str]:
    errors = []
    for dataset in datasets:
        source = dataset.source
        if source.kind != "host":
            continue
        if inventory_hosts and source.peer not in inventory_hosts:
            errors.append(
                f"host {host_name}: datasets.{dataset.name}.source = {source.text!r} names an unknown host; "
                f"expected one of the inventory's hosts: {', '.join(sorted(inventory_hosts))}"
            )
        elif source.peer == host_name:
            errors.append(
                f"host {host_name}: datasets.{dataset.name}.source = {source.text!r} names this host itself; "
                "expected a peer host that holds the dataset"
            )
    return errors


def backups(host_name: str, values: dict[str, Any]) -> list[str]:
    """A repository needs its password; a restore needs a repository to restore from."""
    errors = []
    repository = values["backup_repository"]
    if repository is not None and values["backup_password_file"] is None:
        errors.append(
            f"host {host_name}: backup_password_file = None is invalid with backup_repository = {repository.text!r}; "
            "expected a file on the controller holding the restic password (e.g. ~/.config/labfleet/restic-password)"
        )
    if values["restore_from"] is not None and repository is None:
        errors.append(
            f"host {host_name}: restore_from = {values['restore_from']!r} is invalid without backup_repository; "
            "expected backup_repository set to the repository that holds the snapshots"
        )
    return errors


def migration(host_name: str, values: dict[str, Any], inventory_hosts: frozenset[str]) -> list[str]:
    """The old PC is another host of this inventory (its settings say where the files are), and
    the cut-over names one."""
    errors = []
    old = values["migrate_from"]
    if old is not None and old == host_name:
        errors.append(
            f"host {host_name}: migrate_from = {old!r} names this host itself; "
            "expected the inventory name of the old PC that holds the users' files"
        )
    elif old is not None and inventory_hosts and old not in inventory_hosts:
        errors.append(
            f"host {host_name}: migrate_from = {old!r} is not in the inventory; expected one of its hosts "
            f"({', '.join(sorted(inventory_hosts - {host_name}))}): keep the old PC in the inventory until the cut-over"
        )
    if values["migrate_final"] and old is None:
        errors.append(
            f"host {host_name}: migrate_final = True is invalid without migrate_from; "
            'expected migrate_from = "<old PC>" beside it (or migrate_final = False)'
        )
    if old is not None and values["restore_from"] is not None:
        # Two sources for one home would merge two histories file by file (each run keeps whichever came first).
        errors.append(
            f"host {host_name}: restore_from = {values['restore_from']!r} is invalid with migrate_from = {old!r}; "
            "expected one of them: migrate_from while the old PC lives, restore_from when it is gone"
        )
    return errors


def nvidia_driver(host_name: str, values: dict[str, Any]) -> list[str]:
    """A pinned driver release is one labfleet installs, and one that meets the floor."""
    version = values["nvidia_driver_version"]
    if version is None:
        return []
    errors = []
    if not values["nvidia_driver_install"]:
        errors.append(
            f"host {host_name}: nvidia_driver_version = {version!r} is invalid without nvidia_driver_install = true; "
            "expected nvidia_driver_install = true (labfleet installs the pinned release), "
            "or nvidia_driver_version = None"
        )
    floor = values["nvidia_driver_min"] or CUDA_DRIVER_FLOOR[values["cuda"]]
    if release_key(version) < release_key(floor):
        errors.append(
            f"host {host_name}: nvidia_driver_version = {version!r} is invalid: it is below {floor}, the driver floor "
            f"for cuda {values['cuda']!r} (nvidia_driver_min); expected a release at or above {floor}"
        )
    return errors
