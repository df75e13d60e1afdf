"""Fleet status: one row per host, the odd ones out marked, drift as a non-zero exit.

status.py calls `collect` for each host while pyinfra prepares the run; facts are only
read, so the run changes nothing. When the last host has been read the table (or JSON)
is printed and drift is raised as an error.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

from pyinfra import host
from pyinfra.api import FactBase
from pyinfra.api.exceptions import PyinfraError
from pyinfra.context import state
from pyinfra.facts.deb import DebPackages
from pyinfra.facts.server import LinuxDistribution

from labfleet import image, jupyter
from labfleet.facts import FreeBytes, GpuHost, ImageId
from labfleet.settings import Settings

# Columns that must agree across the fleet; a host that differs from the majority drifts.
FLEET_COLUMNS = ("docker", "toolkit", "image")


class DockerServerVersion(FactBase):
    """The running engine's version, or None when docker is missing or not answering."""

    requires_command = "docker"

    def command(self) -> str:
        return "docker version --format '{{.Server.Version}}' 2>/dev/null || true"

    def process(self, output):
        return output[0].strip() if output and output[0].strip() else None


_rows: dict[str, dict] = {}
_printed: list[bool] = []


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**30:.1f}G"


def host_row(settings: Settings) -> dict:
    distro = host.get_fact(LinuxDistribution) or {}
    packages = host.get_fact(DebPackages) or {}
    toolkit = packages.get("nvidia-container-toolkit")
    tag = image.image_tag(settings)
    users = []
    for project in jupyter.projects(settings):
        service = host.get_fact(jupyter.ComposeService, project=project.name, image=tag)
        users.append(
            {
                "user": project.user.name,
                "url": f"http://{settings.jupyter_bind}:{project.user.port}/lab",
                "health": service["health"] or ("absent" if service["status"] is None else service["status"]),
                "running_image": service["container_image"],
                "current": service["container_image"] is not None and service["container_image"] == service["image_id"],
            }
        )
    gpu = host.get_fact(GpuHost)
    return {
        "host": settings.host,
        "os": f"{distro.get('name', '?')} {distro.get('release_meta', {}).get('VERSION_ID', distro.get('major', ''))}",
        "docker": host.get_fact(DockerServerVersion),
        "toolkit": sorted(toolkit)[-1] if toolkit else None,
        "driver": gpu["driver"],
        "gpus": len(gpu["gpus"]),
        "expected_image": tag,
        "image": host.get_fact(ImageId, ref=tag),
        "users": users,
        "free_datasets": host.get_fact(FreeBytes, path=settings.datasets_root),
        "free_docker": host.get_fact(FreeBytes, path="/var/lib/docker"),
    }


def drift(rows: list[dict]) -> dict[str, list[str]]:
    """Per host, the reasons it differs from the fleet."""
    reasons: dict[str, list[str]] = {row["host"]: [] for row in rows}
    for column in FLEET_COLUMNS:
        values = Counter(row[column] for row in rows)
        majority, _ = values.most_common(1)[0]
        for row in rows:
            if row[column] is None and column == "image":
                reasons[row["host"]].append(f"image {row['expected_image']} missing")
            elif row[column] != majority:
                reasons[row["host"]].append(f"{column} {row[column]} (fleet: {majority})")
    for row in rows:
        for user in row["users"]:
            if user["health"] != "healthy":
                reasons[row["host"]].append(f"{user['user']}: container {user['health']}")
            elif not user["current"]:
                reasons[row["host"]].append(f"{user['user']}: container runs an old image")
    return reasons


def table(rows: list[dict], reasons: dict[str, list[str]]) -> str:
    header = ("", "host", "os", "docker", "toolkit", "driver", "gpus", "image", "jupyter", "free data/docker")
    lines = [header]
    for row in rows:
        image_id = (row["image"] or "missing").removeprefix("sha256:")[:12]
        jupyter_cells = ", ".join(f"{u['user']}:{u['health']} {u['url']}" for u in row["users"]) or "-"
        lines.append(
            (
                "!" if reasons[row["host"]] else " ",
                row["host"],
                row["os"],
                row["docker"] or "-",
                row["toolkit"] or "-",
                row["driver"] or "-",
                str(row["gpus"]),
                image_id,
                jupyter_cells,
                f"{_gib(row['free_datasets'])}/{_gib(row['free_docker'])}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    for name, why in reasons.items():
        if why:
            out.append(f"! {name}: " + "; ".join(why))
    return "\n".join(out)


def _all_collected() -> bool:
    """True once, for whichever host is read last (pyinfra reads hosts concurrently)."""
    active = {h.name for h in state.inventory.get_active_hosts()}
    if _printed or not active <= set(_rows):
        return False
    _printed.append(True)
    return True


def _unreachable_row(name: str) -> dict:
    return {"host": name, "unreachable": True, "users": []}


def collect(settings: Settings) -> None:
    _rows[settings.host] = host_row(settings)
    if not _all_collected():
        return
    rows = [_rows[name] for name in sorted(_rows)]
    unreachable = sorted(h.name for h in state.inventory if h.name not in _rows)
    reasons = drift(rows)
    reasons.update({name: ["unreachable"] for name in unreachable})
    if os.environ.get("LABFLEET_STATUS_FORMAT") == "json":
        document = {"hosts": rows + [_unreachable_row(n) for n in unreachable], "drift": reasons}
        print(json.dumps(document, indent=2, sort_keys=True))
    else:
        print(table(rows, reasons), file=sys.stdout)
    sys.stdout.flush()
    drifting = sorted(name for name, why in reasons.items() if why)
    if drifting:
        total = len(rows) + len(unreachable)
        raise PyinfraError(f"fleet drift on {len(drifting)} of {total} hosts: {', '.join(drifting)}")
