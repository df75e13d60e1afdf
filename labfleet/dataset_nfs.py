"""nfs: datasets, mounted read-only on each host by a systemd mount unit that labfleet writes.

A module of its own because this kind moves no data: it writes a unit whose name systemd
derives from the path (escaped here as systemd-escape does, so no host command is needed to
plan it) and lets systemd mount it at boot.
"""

from __future__ import annotations

from io import StringIO

from pyinfra.operations import files, systemd

from labfleet.dataset_state import _verify, dataset_dir
from labfleet.settings import Dataset, Settings


def systemd_escape_path(path: str) -> str:
    """What ``systemd-escape --path`` prints: the name of the mount unit for a path (without .mount)."""
    trimmed = "/".join(part for part in path.split("/") if part)
    if not trimmed:
        return "-"
    out = []
    for index, char in enumerate(trimmed):
        if char == "/":
            out.append("-")
        elif char.isascii() and (char.isalnum() or char in ":_.") and not (index == 0 and char == "."):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out)


def mount_unit_name(where: str) -> str:
    return systemd_escape_path(where) + ".mount"


def nfs_mount_unit(dataset: Dataset, where: str) -> str:
    """The systemd mount unit that mounts an nfs: dataset read-only at where."""
    what = f"{dataset.source.server}:{dataset.source.export}"
    return (
        "# Written by labfleet (labfleet/datasets.py); edits are replaced on the next run.\n"
        "[Unit]\n"
        f"Description=labfleet dataset {dataset.name} ({what}, read-only)\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Mount]\n"
        f"What={what}\n"
        f"Where={where}\n"
        "Type=nfs\n"
        # nofail: a lab NFS server that is down must not keep a workstation from booting.
        "Options=ro,nosuid,nodev,_netdev,nofail\n"
        "TimeoutSec=60\n"
        "\n"
        "[Install]\n"
        "WantedBy=remote-fs.target\n"
    )


def _mount_nfs(settings: Settings, dataset: Dataset) -> None:
    where = dataset_dir(settings, dataset)
    unit = mount_unit_name(where)
    written = files.put(
        name=f"Write the mount unit of dataset {dataset.name}",
        src=StringIO(nfs_mount_unit(dataset, where)),
        dest=f"/etc/systemd/system/{unit}",
        user="root",
        group="root",
        mode="644",
    )
    systemd.daemon_reload(name=f"Reload systemd for dataset {dataset.name}", _if=written.did_change)
    systemd.service(
        name=f"Mount dataset {dataset.name} read-only",
        service=unit,
        running=True,
        enabled=True,
    )
    systemd.service(
        name=f"Remount dataset {dataset.name} with its new unit",
        service=unit,
        restarted=True,
        _if=written.did_change,
    )


def _bring_in_nfs(settings: Settings, datasets: list[Dataset]) -> None:
    for dataset in datasets:
        _mount_nfs(settings, dataset)
        _verify(settings, dataset)
