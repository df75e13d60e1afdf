"""Fleet status: one row per host, the odd ones out marked, drift as a non-zero exit.

status.py calls ``collect`` for each host while pyinfra prepares the run. Every host is
read in one round trip (``FactBatch``) and nothing is changed: status.py plans no
operation. When the last host has been read, the table (or JSON, with
``LABFLEET_STATUS_FORMAT=json``) is printed on stdout and drift is raised as an error,
which makes pyinfra exit non-zero.

What counts as drift, per host:

- docker or toolkit versions that differ from the fleet's majority (a host without the
  toolkit counts only where one is wanted: a GPU host);
- the expected image tag missing; with ``ship`` and ``registry`` delivery, an image id
  other than the fleet's majority (on a tie, the controller's id decides). ``build`` gives
  each host its own id under the same tag, so only the tag counts. A controller that holds
  another build of the tag than the whole fleet is a note, not drift;
- a jupyter container that is absent, unhealthy, runs another image than its tag names,
  or was started with other settings than the current ones (deploy not run since);
- a dataset that is missing, not mounted, or does not match its manifest; with
  ``--verify`` (``LABFLEET_STATUS_VERIFY=1``), one that differs from its source;
- an unreachable host.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping

from pyinfra.context import state
from pyinfra.facts.server import LinuxDistribution

from labfleet import (
    archives,
    backup,
    compose,
    dataset_verify,
    gpu_usage,
    image,
    migrate,
    nvidia,
    planning,
    preflight,
    shipping,
    updates,
)
from labfleet.dataset_state import dataset_dir, stamp_path
from labfleet.facts.backup import BackupSummary
from labfleet.facts.docker import DockerEngineStatus
from labfleet.facts.gpu_usage import GpuUsage
from labfleet.facts.home import SIZE_SECONDS, HomeSize
from labfleet.facts.image import ImageId
from labfleet.facts.nvidia import GpuHost
from labfleet.facts.nvidia_driver import NvidiaDriver, reboot_needed
from labfleet.facts.report import DatasetStates, ProjectContainer, ToolkitVersion
from labfleet.facts.system import FreeBytes
from labfleet.facts.updates import PendingState, PendingUpdate
from labfleet.planning import Read, current_run
from labfleet.settings import Settings

FORMAT_ENV = "LABFLEET_STATUS_FORMAT"

# Dataset states that are fine; any other state marks the host.
DATASET_OK = ("ok", "present", "mounted")

# --- Facts only the status reads ------------------------------------------------------------


# --- One host ----------------------------------------------------------------------------------


def _dataset_entries(settings: Settings) -> tuple:
    entries = []
    for dataset in settings.datasets:
        directory = dataset_dir(settings, dataset)
        manifest = f"{directory}/{dataset.manifest}" if dataset.manifest else ""
        mount = dataset.source.kind == "nfs"
        entries.append((dataset.name, directory, manifest, stamp_path(dataset), mount))
    return tuple(entries)


def _os_name(distro: Mapping) -> str:
    meta = distro.get("release_meta") or {}
    version = meta.get("VERSION_ID") or distro.get("major") or ""
    return f"{distro.get('name') or '?'} {version}".strip()


def _expected_digest(settings: Settings, user, ids: tuple[int, int] | None, gpu: bool, tag: str) -> str | None:
    """The config digest a current container of this user carries, or None without the account."""
    if ids is None:
        return None
    project = compose.Project(settings, user, ids[0], ids[1], gpu, tag)
    return compose.project_digest(project)


def reads(settings: Settings) -> dict[str, Read]:
    """Everything the status shows about this host; with the deploy's own reads where they are the same."""
    tag = image.image_tag(settings)
    return {
        "distro": Read(LinuxDistribution),
        "engine": Read(DockerEngineStatus),
        "toolkit": Read(ToolkitVersion),
        "gpu": Read(GpuHost),
        "nvidia_driver": Read(NvidiaDriver),
        # Each GPU's load and the compute processes on it, with what names their owners.
        "gpu_usage": Read(GpuUsage),
        "image_id": Read(ImageId, {"ref": tag}),
        "free_datasets": Read(FreeBytes, {"path": settings.datasets_root}),
        "free_docker": Read(FreeBytes, {"path": shipping.DOCKER_ROOT}),
        "datasets": Read(DatasetStates, {"entries": _dataset_entries(settings)}),
        **preflight.reads(settings),
        **{
            f"service {user.name}": Read(ProjectContainer, {"project": compose.project_name(user.name), "image": tag})
            for user in settings.jupyter_users
        },
        # Each home's size, by du with a time limit: a home full of model caches may hold
        # millions of files, and status must stay quick (an unfinished count shows as such).
        **{f"home size {user.name}": Read(HomeSize, {"path": user.home_dir}) for user in settings.jupyter_users},
        # An update that waits for idle work (its timer armed), and what it waits for.
        **{f"update {user.name}": _pending_read(settings, user.name) for user in settings.jupyter_users},
        # Projects handed over to a new PC at a cut-over (labfleet.migrate).
        "migrated": migrate.marker_read(settings),
        # With --verify: each host: dataset compared in full with its peer's copy.
        **dataset_verify.reads(settings),
        # What the backup service left after its last run; the repository itself is never reached.
        **({"backup": Read(BackupSummary)} if settings.backup_repository else {}),
    }


def _pending_read(settings: Settings, user: str) -> Read:
    container = compose.container_name(compose.project_name(user))
    timer = updates.timer_name(user)
    return Read(PendingUpdate, {"timer": timer, "container": container, "idle_seconds": settings.jupyter_update_idle})


def host_row(settings: Settings) -> dict:
    """Everything the status shows about this host, read in one round trip."""
    tag = image.image_tag(settings)
    found = planning.read(reads(settings))
    image_id, gpu, accounts = found["image_id"], found["gpu"], found["accounts"]
    has_gpu = nvidia.has_gpu(settings)
    gpu_use = gpu_usage.host_gpu_use(found["gpu_usage"], settings.jupyter_cull_idle)
    users = []
    moves = migrate.moves(settings, found["migrated"])
    for user in settings.jupyter_users:
        service = found[f"service {user.name}"]
        account = accounts.get(user.name)
        ids = (int(account["uid"]), int(account["gid"])) if account else None
        digest = _expected_digest(settings, user, ids, has_gpu, tag)
        users.append(
            {
                "user": user.name,
                "url": compose.url(settings, user.port),
                "status": service["status"],
                "health": service["health"] if service["status"] == "running" else (service["status"] or "absent"),
                "restarts": service["restarts"],
                "running_image": service["container_image"],
                "current": service["container_image"] is not None and service["container_image"] == image_id,
                "config_current": digest is not None and service["digest"] == digest,
                "home": user.home_dir,
                "home_bytes": found[f"home size {user.name}"]["bytes"],
                "home_counted": found[f"home size {user.name}"]["counted"],
                "pending": pending_reasons(found[f"update {user.name}"]),
                "moved": moves.get(user.name),
            }
        )
    return {
        "host": settings.host,
        "os": _os_name(found["distro"] or {}),
        "docker": found["engine"]["server"],
        "compose": found["engine"]["compose"],
        "toolkit": found["toolkit"],
        "toolkit_wanted": nvidia.wants_toolkit(settings),
        "driver": gpu["driver"],
        # (loaded module or None, installed release) while the host still has to reboot into it
        "reboot_needed": reboot_needed(found["nvidia_driver"]),
        "gpus": len(gpu["gpus"]),
        "gpu_names": [g["name"] for g in gpu_use["gpus"]] if gpu_use and gpu_use["gpus"] else None,
        "gpu_use": gpu_use,
        "delivery": settings.image_delivery,
        "expected_image": tag,
        "image": image_id,
        "users": users,
        "datasets": {dataset.name: found["datasets"].get(dataset.name, "missing") for dataset in settings.datasets},
        # With --verify: per dataset that differs from its source, why (labfleet/dataset_verify.py).
        "dataset_drift": dataset_verify.differences(settings, found),
        "backup": backup.status_row(settings, found["backup"]) if "backup" in found else None,
        "free_datasets": found["free_datasets"],
        "free_docker": found["free_docker"],
    }


# --- The fleet --------------------------------------------------------------------------------


def _odd_ones(rows: list[dict], column: str) -> list[tuple[dict, str]]:
    """(row, what the fleet has) for each row whose column differs from the strict majority.

    Without a strict majority (two hosts, two versions) every row differs.
    """
    values = Counter(row[column] for row in rows)
    if len(values) <= 1:
        return []
    top, count = values.most_common(1)[0]
    if count * 2 > len(rows):
        return [(row, str(top)) for row in rows if row[column] != top]
    spread = ", ".join(f"{value} on {n}" for value, n in sorted(values.items(), key=lambda item: str(item[0])))
    return [(row, f"no majority: {spread}") for row in rows]


def fleet_image_ids(rows: list[dict], controller_ids: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
    """Per expected tag, the image id every host with that tag should have.

    ``ship`` and ``registry`` put one id on every host, so the hosts are compared with
    each other: the strict majority of their ids, or, on a tie, the controller's id when
    one of them has it. ``build`` hosts build their own (None: only the tag is compared).
    """
    controller_ids = controller_ids or {}
    expected: dict[str, str | None] = {}
    for tag in dict.fromkeys(row["expected_image"] for row in rows):
        group = [row for row in rows if row["expected_image"] == tag]
        ids = Counter(row["image"] for row in group if row["image"])
        if all(row["delivery"] == "build" for row in group) or not ids:
            expected[tag] = None
            continue
        top, count = ids.most_common(1)[0]
        if count * 2 > sum(ids.values()):
            expected[tag] = top
        else:
            expected[tag] = controller_ids.get(tag) if controller_ids.get(tag) in ids else None
    return expected


def notes(image_ids: Mapping[str, str | None], controller_ids: Mapping[str, str | None]) -> list[str]:
    """What a person should know that is not drift: the controller holds another build of a tag."""
    out = []
    for tag, wanted in image_ids.items():
        mine = controller_ids.get(tag)
        if wanted and mine and mine != wanted:
            out.append(
                f"the controller's {tag} is {_short(mine)}, the fleet runs {_short(wanted)}; "
                "the next deploy ships the controller's build to every host"
            )
    return out


def image_matches(row: dict, image_ids: Mapping[str, str | None]) -> bool:
    """The host has the expected tag, and, where the fleet shares one id, that id."""
    if row["image"] is None:
        return False
    wanted = image_ids.get(row["expected_image"])
    return row["delivery"] == "build" or wanted is None or row["image"] == wanted


def drift(rows: list[dict], image_ids: Mapping[str, str | None] | None = None) -> dict[str, list[str]]:
    """Per host, the reasons it differs from the fleet or from its settings (empty: fine)."""
    image_ids = fleet_image_ids(rows) if image_ids is None else image_ids
    reasons: dict[str, list[str]] = {row["host"]: [] for row in rows}

    for row in rows:
        if row["docker"] is None:
            reasons[row["host"]].append("docker is not answering")
        if row.get("reboot_needed"):
            module, installed = row["reboot_needed"]
            reasons[row["host"]].append(
                f"reboot needed: NVIDIA module {module or 'none'} loaded, {installed} installed (reboot {row['host']})"
            )
        if row["toolkit"] is None and row["toolkit_wanted"]:
            reasons[row["host"]].append("nvidia-container-toolkit is missing")
    for column in ("docker", "toolkit"):
        for row, fleet in _odd_ones([row for row in rows if row[column] is not None], column):
            reasons[row["host"]].append(f"{column} {row[column]} (fleet: {fleet})")

    for row in rows:
        tag = row["expected_image"]
        if row["image"] is None:
            reasons[row["host"]].append(f"image {tag} missing")
        elif not image_matches(row, image_ids):
            reasons[row["host"]].append(f"image {_short(row['image'])} is not the fleet's {_short(image_ids[tag])}")
    for tag, wanted in image_ids.items():
        group = [row for row in rows if row["expected_image"] == tag and row["image"] and row["delivery"] != "build"]
        if wanted is None and len({row["image"] for row in group}) > 1:
            for row in group:
                reasons[row["host"]].append(f"image {_short(row['image'])}: the fleet has no majority id for {tag}")

    for row in rows:
        for user in row["users"]:
            if user.get("moved"):
                continue  # on purpose: migrated to another PC, or waiting for the cut-over to this one
            if user["health"] != "healthy":
                reasons[row["host"]].append(f"{user['user']}: container {user['health']}")
            elif user.get("pending") is not None:
                continue  # waits for idle work on purpose: pending_notes says so
            elif not user["current"]:
                reasons[row["host"]].append(
                    f"{user['user']}: container runs {_short(user['running_image'])}, not what "
                    f"{row['expected_image']} names now ({_short(row['image'])})"
                )
            elif not user["config_current"]:
                reasons[row["host"]].append(f"{user['user']}: container runs other settings; run the deploy")
        for name, why in row.get("dataset_drift", {}).items():
            reasons[row["host"]].append(f"dataset {name}: {why}")
        for name, dataset_state in row["datasets"].items():
            if dataset_state not in DATASET_OK:
                reasons[row["host"]].append(f"dataset {name} {dataset_state}")
        reasons[row["host"]].extend(backup.status_reasons(row.get("backup")))
    return reasons


def pending_reasons(found: PendingState) -> list[str] | None:
    """What an update of this user waits for (None: no update waits)."""
    if not found["armed"]:
        return None
    busy = found["busy"]
    return busy["reasons"] or ["idle now; the host's timer applies it at its next check"]


def pending_notes(rows: list[dict]) -> list[str]:
    """One line per user whose update waits for idle work: not drift, the host applies it by itself."""
    return [
        f"{row['host']}: {user['user']}: update pending ({'; '.join(user['pending'])}); it lands by itself "
        f"once idle, or now with ./run deploy {updates.FORCE_HINT}"
        for row in rows
        for user in row["users"]
        if user.get("pending") is not None
    ]


def _short(image_id: str | None) -> str:
    return (image_id or "none").removeprefix("sha256:")[:12]


def _gib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**30:.1f}G"


def _gpus_cell(row: dict) -> str:
    names = row.get("gpu_names")
    if not names:
        return str(row["gpus"])
    counted = Counter(names)
    return f"{row['gpus']}: " + ", ".join(f"{n}x {name}" for name, n in counted.items())


def _image_cell(row: dict, image_ids: Mapping[str, str | None]) -> str:
    if row["image"] is None:
        return "missing"
    return _short(row["image"]) + ("" if image_matches(row, image_ids) else " (differs)")


def _jupyter_cell(user: dict) -> str:
    if user.get("moved"):
        return f"{user['user']}:{user['moved']}"
    return f"{user['user']}:{user['health']} {user['url']}"


def _home_cell(user: dict) -> str:
    if not user.get("home_counted", True):
        return f"? (du > {SIZE_SECONDS}s)"
    size = user.get("home_bytes")
    return "missing" if size is None else _gib(size)


HEADER = (
    *("", "host", "os", "docker", "toolkit", "driver", "gpus", "image", "jupyter", "home"),
    *("datasets", "free data/docker", "backup"),
)


def table(
    rows: list[dict],
    reasons: Mapping[str, list[str]],
    image_ids: Mapping[str, str | None] | None = None,
    unreachable: Iterable[str] = (),
    remarks: Iterable[str] = (),
) -> str:
    """The status as text: a row per host, ``!`` in front of the hosts that drift, then why."""
    image_ids = fleet_image_ids(rows) if image_ids is None else image_ids
    lines: list[tuple[str, ...]] = [HEADER]
    for row in rows:
        jupyter_cell = ", ".join(_jupyter_cell(u) for u in row["users"]) or "-"
        differ = row.get("dataset_drift", {})
        datasets_cell = (
            ", ".join(f"{name}:{'differs' if name in differ else s}" for name, s in row["datasets"].items()) or "-"
        )
        home_cell = ", ".join(f"{u['user']}:{_home_cell(u)}" for u in row["users"]) or "-"
        lines.append(
            (
                "!" if reasons.get(row["host"]) else " ",
                row["host"],
                row["os"],
                row["docker"] or "-",
                row["toolkit"] or "-",
                (row["driver"] or "-") + (" (reboot needed)" if row.get("reboot_needed") else ""),
                _gpus_cell(row),
                _image_cell(row, image_ids),
                jupyter_cell,
                home_cell,
                datasets_cell,
                f"{_gib(row['free_datasets'])}/{_gib(row['free_docker'])}",
                backup.status_cell(row.get("backup")),
            )
        )
    for name in unreachable:
        lines.append(("!", name, "unreachable", *("-" for _ in HEADER[3:])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    # Who uses which GPU, below the hosts (only where a host has nvidia-smi), after a blank line.
    gpus = gpu_usage.gpu_lines((row["host"], row.get("gpu_use")) for row in rows)
    out += ["", *gpus] if gpus else []
    for name, why in reasons.items():
        if why:
            out.append(f"! {name}: " + "; ".join(why))
    out += [f"note: {remark}" for remark in remarks]
    return "\n".join(out)


def document(
    rows: list[dict],
    reasons: Mapping[str, list[str]],
    image_ids: Mapping[str, str | None],
    remarks: Iterable[str] = (),
) -> dict:
    """The status as JSON: ``hosts`` (each with ``drift`` and ``ok``), ``drift`` per drifting host, ``ok``."""
    hosts = []
    for row in rows:
        hosts.append(
            {
                **row,
                "image_matches": image_matches(row, image_ids),
                "drift": reasons[row["host"]],
                "ok": not reasons[row["host"]],
            }
        )
    for name in sorted(set(reasons) - {row["host"] for row in rows}):
        hosts.append({"host": name, "unreachable": True, "drift": reasons[name], "ok": False})
    return {
        "hosts": hosts,
        "image_ids": dict(image_ids),
        "drift": {name: why for name, why in reasons.items() if why},
        "notes": list(remarks),
        "ok": not any(reasons.values()),
    }


def _controller_image_ids(rows: list[dict]) -> dict[str, str | None]:
    """The controller's id of each shipped tag, where its engine has the tag (None otherwise)."""
    found: dict[str, str | None] = {}
    for tag in {row["expected_image"] for row in rows if row["delivery"] != "build"}:
        try:
            found[tag] = archives.controller().image_id(tag)
        except (RuntimeError, OSError):
            found[tag] = None
    return found


# --- Gathering ---------------------------------------------------------------------------------


def _all_collected(rows: dict[str, dict]) -> bool:
    """True once, for whichever host is read last (pyinfra prepares hosts concurrently)."""
    active = {h.name for h in state.inventory.get_active_hosts()}
    if "printed" in rows or not active <= set(rows):
        return False
    rows["printed"] = {}
    return True


def collect(settings: Settings) -> None:
    """Read this host; once every reachable host is read, print the status and its verdict.

    Drift ends the run with exit status 1 after the verdict line: a SystemExit, not a
    pyinfra error, which would point at this file as if it had crashed.
    """
    run = current_run()
    with run.lock:
        collected: dict[str, dict] = run.shared.setdefault("status rows", {})
        collected[settings.host] = host_row(settings)
        if not _all_collected(collected):
            return
    rows = [collected[name] for name in sorted(collected) if name != "printed"]
    unreachable = sorted(h.name for h in state.inventory if h.name not in collected)
    controller_ids = _controller_image_ids(rows)
    image_ids = fleet_image_ids(rows, controller_ids)
    reasons = drift(rows, image_ids)
    reasons.update({name: ["unreachable"] for name in unreachable})
    remarks = notes(image_ids, controller_ids) + pending_notes(rows)
    remarks += gpu_usage.idle_notes((row["host"], row.get("gpu_use")) for row in rows)
    if os.environ.get(FORMAT_ENV) == "json":
        print(json.dumps(document(rows, reasons, image_ids, remarks), indent=2, sort_keys=True))
    else:
        print(table(rows, reasons, image_ids, unreachable, remarks))
        print(verdict(reasons, len(rows) + len(unreachable)))
    sys.stdout.flush()
    if any(reasons.values()):
        raise SystemExit(1)


def verdict(reasons: Mapping[str, list[str]], total: int) -> str:
    """The status's last line: the fleet is identical, or which hosts drift."""
    drifting = sorted(name for name, why in reasons.items() if why)
    if not drifting:
        return f"labfleet status: all {total} hosts match the fleet and their settings"
    return f"labfleet status: drift on {len(drifting)} of {total} hosts: {', '.join(drifting)}"
