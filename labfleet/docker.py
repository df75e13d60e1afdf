"""Docker Engine on every host: packages, apt source, daemon.json, service, docker group.

``ensure_docker_engine(settings, daemon_extra=...)`` is the docker step of deploy.py. It
decides everything from facts, so a second run changes nothing:

1. Stops this host, before changing anything, when the distribution is not Debian or
   Ubuntu, when /etc/docker/daemon.json is not valid JSON, when a docker_users account is
   missing, or when an apt file mixes Docker's entries with another repository's.
2. Removes the packages that conflict with the chosen source (only those installed; a
   package named in docker_packages is never removed) and Docker's stale apt files: an
   old docker.list or a second key, which make apt fail with "Conflicting values set for
   option Signed-By". Files of other repositories are never touched.
3. ``docker_source = "docker-ce"``: Docker's repository as /etc/apt/sources.list.d/docker.sources
   (deb822) whose Signed-By is /etc/apt/keyrings/docker.asc, for the host's distribution,
   codename and dpkg architecture. The key comes from ``{docker_apt_mirror}/{distro}/gpg``
   and is replaced only when the served key differs. ``docker_version`` pins docker-ce and
   docker-ce-cli (which share Docker's version string) in the install and in
   /etc/apt/preferences.d/labfleet-docker; containerd.io and the buildx and compose plugins
   are installed in the same apt transaction, so apt picks the versions the pinned engine
   depends on. ``docker_source = "distro"``: the distribution's docker.io, its CLI, its
   Compose v2 and buildx.
4. Installs what is missing; ``apt-get update`` runs only then, or when a source changed.
   Every apt command waits for a lock held by another process (labfleet/apt.py).
5. Merges the wanted keys into /etc/docker/daemon.json (``daemon_config``), validates the
   result with ``dockerd --validate`` where the engine has it, and restarts dockerd only
   when the parsed config changed. Starts and enables the service.
6. Adds docker_users and the jupyter users to the docker group.
7. Checks that ``docker info`` answers and that ``docker compose version`` is v2.

Compose v2 on Debian 12 (bookworm): Debian 12 ships only Compose v1 (docker-compose 1.29,
no ``docker compose``), and labfleet runs ``docker compose``. The default source,
docker-ce, brings the docker-compose-plugin on bookworm as everywhere. With
``docker_source = "distro"`` and no ``docker_packages`` of your own, a bookworm host stops
before anything changes, with a message that says to use docker-ce or to list a Compose
v2 package from your own mirror in docker_packages. A custom list is installed and then
held to the same check: ``docker compose version`` must report v2.

Later steps add to daemon.json through ``daemon_extra``: mappings that are merged, in
order, under the user's ``docker_daemon``, so that one write and at most one restart
cover the engine, the NVIDIA runtime and the registry. For example deploy.py can call
``ensure_docker_engine(settings, daemon_extra=[nvidia.daemon_keys(settings)])``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterable, Mapping
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, deploy, operation
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import files, server

from labfleet import apt
from labfleet.facts.apt import AptSourceEntries
from labfleet.facts.docker import AppArmorEnabled, DaemonJson, DockerEngineStatus
from labfleet.facts.system import GroupMembers, ServiceState
from labfleet.planning import planned, prefetch, worth_planning
from labfleet.preflight import require
from labfleet.settings import Settings

SOURCES_FILE = "/etc/apt/sources.list.d/docker.sources"
KEYRING = f"{apt.KEYRING_DIR}/docker.asc"
PIN_FILE = "/etc/apt/preferences.d/labfleet-docker"
DAEMON_JSON = "/etc/docker/daemon.json"
DOCKER_GROUP = "docker"
DOCKER_SERVICE = "docker.service"
# Where Docker's install guides, older guides and other tools have put Docker's key.
DOCKER_KEY_FILES = (
    KEYRING,
    f"{apt.KEYRING_DIR}/docker.gpg",
    f"{apt.KEYRING_DIR}/docker-archive-keyring.gpg",
    "/usr/share/keyrings/docker.gpg",
    "/usr/share/keyrings/docker.asc",
    "/usr/share/keyrings/docker-archive-keyring.gpg",
    "/etc/apt/trusted.gpg.d/docker.gpg",
    "/etc/apt/trusted.gpg.d/docker.asc",
    "/etc/apt/trusted.gpg.d/docker-archive-keyring.gpg",
)
DOCKER_REPOSITORY = "download.docker.com/linux/"

DOCKER_CE_PACKAGES = ("docker-ce", "docker-ce-cli", "containerd.io", "docker-buildx-plugin", "docker-compose-plugin")
# The packages each source replaces; apt refuses to install one set over the other.
CONFLICTS = {
    "docker-ce": (
        "docker.io",
        "docker-doc",
        "docker-cli",
        "docker-compose",
        "docker-compose-v2",
        "docker-buildx",
        "podman-docker",
        "containerd",
        "runc",
    ),
    "distro": (*DOCKER_CE_PACKAGES, "docker-ce-rootless-extras", "podman-docker"),
}
# The packages docker_version pins: those that carry the engine's own version string.
PINNED = {"docker-ce": ("docker-ce", "docker-ce-cli"), "distro": ("docker.io", "docker-cli")}


class UnsupportedDistribution(ValueError):
    """The host is not a Debian or Ubuntu release labfleet knows how to give Docker."""


def distribution(release: Mapping) -> tuple[str, str, int | None]:
    """``(distro, codename, major)`` from the LinuxDistribution fact: ``("debian", "trixie", 13)``.

    Ubuntu derivatives (ID_LIKE ubuntu) use Ubuntu's repository, as Docker's guide says.
    """
    meta = release.get("release_meta") or {}
    distro_id = (meta.get("ID") or "").lower()
    like = (meta.get("ID_LIKE") or "").lower().split()
    if distro_id in ("debian", "ubuntu"):
        codename = meta.get("VERSION_CODENAME") or meta.get("UBUNTU_CODENAME") or ""
    elif "ubuntu" in like:
        distro_id, codename = "ubuntu", meta.get("UBUNTU_CODENAME") or ""
    else:
        name = release.get("name") or distro_id or "this distribution"
        raise UnsupportedDistribution(f"{name} is not Debian or Ubuntu")
    if not codename:
        raise UnsupportedDistribution(f"/etc/os-release of this {distro_id} host names no VERSION_CODENAME")
    return distro_id, codename, release.get("major")


def default_packages(source: str, distro: str, major: int | None) -> tuple[str, ...] | None:
    """The packages installed when docker_packages is None; None when the source has no Compose v2."""
    if source == "docker-ce":
        return DOCKER_CE_PACKAGES
    if distro == "ubuntu":
        return ("docker.io", "docker-compose-v2", "docker-buildx")
    if major is not None and major < 13:
        return None
    # Debian 13's docker.io only recommends docker-cli, which holds the docker command.
    return ("docker.io", "docker-cli", "docker-compose", "docker-buildx")


def packages_to_install(
    settings: Settings, distro: str, major: int | None, apparmor: bool = False, curl: bool = False
) -> tuple[str, ...] | None:
    """docker_packages (or the source's defaults), with docker_version applied; None: no Compose v2 here.

    curl: add curl, through which every later run reads the engine's state (facts.docker_api).
    """
    listed = settings.docker_packages
    if listed is None:
        listed = default_packages(settings.docker_source, distro, major)
        if listed is None:
            return None
    packages = []
    for package in listed:
        name, version = apt.split_version(package)
        if version is None and settings.docker_version and name in PINNED[settings.docker_source]:
            package = f"{name}={settings.docker_version}"
        packages.append(package)
    # dockerd loads its AppArmor profile with apparmor_parser when the kernel enforces AppArmor.
    names = {apt.split_version(p)[0] for p in packages}
    if apparmor and "apparmor" not in names:
        packages.append("apparmor")
    if curl and "curl" not in names:
        packages.append("curl")
    return tuple(packages)


def conflicting_packages(settings: Settings, wanted: Iterable[str]) -> tuple[str, ...]:
    keep = {apt.split_version(package)[0] for package in wanted}
    return tuple(name for name in CONFLICTS[settings.docker_source] if name not in keep)


def repository_url(settings: Settings, distro: str) -> str:
    return f"{settings.docker_apt_mirror}/{distro}"


def sources_file(settings: Settings, distro: str, codename: str, arch: str) -> str:
    """The text of /etc/apt/sources.list.d/docker.sources."""
    return apt.deb822_source(
        uris=repository_url(settings, distro),
        suites=codename,
        components="stable",
        architectures=arch,
        signed_by=KEYRING,
        comment="Docker's apt repository; written by labfleet (docker_source, docker_apt_mirror).",
    )


def repository_markers(settings: Settings, distro: str) -> tuple[str, ...]:
    """URL fragments that identify an apt entry as Docker's (upstream or the configured mirror)."""
    mirror = repository_url(settings, distro).split("://", 1)[-1]
    return tuple(dict.fromkeys((DOCKER_REPOSITORY, mirror + "/", mirror + " ")))


def stale_apt_files(settings: Settings, entries: Mapping) -> tuple[list[str], list[str]]:
    """``(to_remove, mixed)``: Docker's apt files that are not the one labfleet keeps, and
    files that mix Docker's entries with other repositories' (left alone, reported)."""
    keep = {SOURCES_FILE, KEYRING} if settings.docker_source == "docker-ce" else set()
    if settings.docker_version is not None and settings.docker_source == "docker-ce":
        keep.add(PIN_FILE)
    remove, mixed = [], []
    for entry in entries["files"]:
        if entry["path"] in keep:
            continue
        if entry["matching"] == entry["entries"] and entry["path"] != "/etc/apt/sources.list":
            remove.append(entry["path"])
        else:
            mixed.append(entry["path"])
    remove += [path for path in entries["present"] if path not in keep and path not in remove]
    return remove, mixed


def deep_merge(base: Mapping, overlay: Mapping) -> dict:
    """base with overlay's keys set; nested mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def daemon_config(settings: Settings, extra: Iterable[Mapping] = ()) -> dict:
    """The keys labfleet wants in daemon.json: each later step's extra, then the user's docker_daemon."""
    wanted: dict = {}
    for keys in extra:
        wanted = deep_merge(wanted, keys)
    return deep_merge(wanted, settings.docker_daemon)


def merged_daemon_json(current: Mapping, wanted: Mapping) -> dict:
    """The file's content after the merge: every key set by hand survives."""
    return deep_merge(current, wanted)


@operation(is_idempotent=True)
def merge_daemon_json(keys: dict, path: str = DAEMON_JSON):
    """Merge keys into Docker's daemon.json; validate the result before it replaces the file.

    + keys: the daemon.json keys to set; nested mappings merge key by key
    + path: the daemon.json to merge into

    The parsed JSON is compared, so a file that differs only in formatting is left alone.
    A file that is not valid JSON stops this host and is left untouched. The new file is
    checked with ``dockerd --validate`` (Docker 23 and later) before it is moved in place.

    **Example:**

    .. code:: python

        merge_daemon_json(name="Log rotation", keys={"log-driver": "local"})
    """
    current = host.get_fact(DaemonJson, path=path)
    if current["error"]:
        yield f"echo {shlex.quote(_invalid_daemon_json(path, current['error']))} >&2; exit 1"
        return
    existing = current["config"] if current["present"] else {}
    merged = merged_daemon_json(existing, keys)
    if current["present"] and merged == existing:
        host.noop(f"{path} already has the wanted keys")
        return
    if not current["present"] and not merged:
        host.noop(f"nothing to write to {path}")
        return
    staged = f"{path}.labfleet-new"
    q_path, q_staged = shlex.quote(path), shlex.quote(staged)
    rejected = shlex.quote(f"labfleet: dockerd rejects the merged {path}; the running engine and {path} are unchanged")
    yield f"install -d -m 755 {shlex.quote(path.rsplit('/', 1)[0] or '/')}"
    yield FileUploadCommand(StringIO(json.dumps(merged, indent=2) + "\n"), staged)
    yield (
        f"if dockerd --help 2>/dev/null | grep -q -- --validate; then "
        f"dockerd --validate --config-file={q_staged} || {{ rm -f {q_staged}; echo {rejected} >&2; exit 1; }}; fi; "
        f"chown root:root {q_staged} && chmod 644 {q_staged} && mv -f {q_staged} {q_path}"
    )


def _invalid_daemon_json(path: str, error: str) -> str:
    return (
        f"labfleet: {path} on this host is not valid JSON ({error}); it was left untouched. "
        "Fix it by hand (python3 -m json.tool shows where), then run the deploy again"
    )


@operation(is_idempotent=False)
def restart_service(service: str):
    """Restart a systemd service, or start it when it is stopped; meant for ``_if=<op>.did_change``.

    + service: the unit name

    ``systemd.service(restarted=True)`` restarts only a unit that was running when the
    deploy was planned, so it would skip an engine that the same run installed.

    **Example:**

    .. code:: python

        restart_service(name="Restart dockerd", service="docker.service", _if=daemon.did_change)
    """
    yield f"systemctl restart {shlex.quote(service)}"


def unit_exists(state: Mapping) -> bool:
    """From ServiceState: systemctl is-enabled prints nothing, or "not-found", for a unit that does not exist."""
    return state["enabled"] not in (None, "not-found")


@operation(is_idempotent=True)
def ensure_service(service: str, if_present: bool = False):
    """Start a systemd service if it is stopped and enable it if it is not.

    + service: the unit name
    + if_present: do nothing where no package has installed the unit (optional units)

    **Example:**

    .. code:: python

        ensure_service(name="Start and enable dockerd", service="docker.service")
        ensure_service(name="Enable nvidia-cdi-refresh", service="nvidia-cdi-refresh.path", if_present=True)
    """
    state = host.get_fact(ServiceState, service=service)
    if if_present and not unit_exists(state):
        host.noop(f"there is no {service} here")
        return
    if state["active"] == "active" and state["enabled"] == "enabled":
        host.noop(f"{service} is running and enabled")
        return
    if state["enabled"] != "enabled":
        yield f"systemctl enable {shlex.quote(service)}"
    if state["active"] != "active":
        yield f"systemctl start {shlex.quote(service)}"


@operation(is_idempotent=True)
def add_to_group(user: str, group: str):
    """Add an existing account to a supplementary group, keeping its other groups.

    + user: the account
    + group: the group, which must exist when the command runs

    **Example:**

    .. code:: python

        add_to_group(name="alice may use docker", user="alice", group="docker")
    """
    if user in host.get_fact(GroupMembers, group=group)["members"]:
        host.noop(f"{user} already in group {group}")
        return
    yield f"gpasswd -a {shlex.quote(user)} {shlex.quote(group)} >/dev/null"


@operation(is_idempotent=True)
def check_engine(known: Mapping | None = None):
    """Check that ``docker info`` answers and that ``docker compose version`` reports v2; change nothing.

    + known: a DockerEngineStatus read earlier in this run, when nothing changed since

    Healthy: a no-op, on the first run as on every other. Otherwise the host runs the
    check itself, giving a starting engine up to 60 s, and fails with what is wrong.

    **Example:**

    .. code:: python

        check_engine(name="Check the engine")
    """
    status = known or host.get_fact(DockerEngineStatus)
    if status["server"] and _is_compose_v2(status["compose"]):
        host.noop(f"engine {status['server']} answers, docker compose {status['compose']}")
        return
    no_engine = shlex.quote("labfleet: docker info does not answer after 60 s; see journalctl -u docker")
    no_compose = shlex.quote(
        "labfleet: docker compose version does not report v2 (Compose v1 or none is installed); "
        "use docker_source = 'docker-ce', or list a Compose v2 package in docker_packages"
    )
    yield (
        "i=0; until docker info >/dev/null 2>&1; do i=$((i+1)); "
        f"if [ $i -ge 60 ]; then docker info >&2; echo {no_engine} >&2; exit 1; fi; sleep 1; done; "
        "v=$(docker compose version --short 2>/dev/null); "
        f'case "${{v#v}}" in [2-9].*|[1-9][0-9]*.*) ;; *) echo {no_compose} >&2; exit 1;; esac'
    )


def _is_compose_v2(version: str | None) -> bool:
    major = (version or "").split(".", 1)[0]
    return major.isdigit() and int(major) >= 2


def docker_group_members(settings: Settings) -> list[str]:
    return sorted(set(settings.docker_users) | {user.name for user in settings.jupyter_users})


def state_parts(settings: Settings) -> tuple:
    """The facts the docker step decides from while planning."""
    markers = tuple(marker for distro in ("debian", "ubuntu") for marker in repository_markers(settings, distro))
    return (
        (LinuxDistribution, {}),
        (DebArch, {}),
        (AppArmorEnabled, {}),
        (DebPackages, {}),
        (AptSourceEntries, {"markers": markers, "paths": (*DOCKER_KEY_FILES, PIN_FILE, SOURCES_FILE)}),
        (DaemonJson, {"path": DAEMON_JSON}),
        (ServiceState, {"service": DOCKER_SERVICE}),
        (DockerEngineStatus, {}),
        (GroupMembers, {"group": DOCKER_GROUP, "users": tuple(docker_group_members(settings))}),
    )


def read_host_state(settings: Settings) -> list:
    """Everything the docker step decides from, in one round trip (labfleet.facts.prefetch)."""
    parts = state_parts(settings)
    prefetch(parts)
    return [planned(fact, **kwargs) for fact, kwargs in parts]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@deploy("Install Docker Engine")
def ensure_docker_engine(settings: Settings, daemon_extra: Iterable[Mapping] = ()):
    """Docker Engine from the configured source, with the merged daemon.json, running and checked.

    + settings: this host's Settings
    + daemon_extra: daemon.json keys from later steps (NVIDIA runtime, registries), merged
      under docker_daemon into one write and at most one restart
    """
    members = docker_group_members(settings)
    platform, arch, apparmor_on, installed, apt_files, daemon_json, service, engine, group = read_host_state(settings)
    try:
        distro, codename, major = distribution(platform)
    except UnsupportedDistribution as error:
        require(
            name="Check that Docker can be installed here",
            ok=False,
            problem=f"host {settings.host}: {error}; labfleet installs Docker on Debian 12/13 and Ubuntu 22.04/24.04",
        )
        return

    packages = packages_to_install(
        settings, distro, major, apparmor=apparmor_on and "apparmor" not in installed, curl="curl" not in installed
    )
    stale, mixed = stale_apt_files(settings, apt_files)

    # Everything that would stop this host is checked before anything on it changes.
    checks = [
        (
            service["systemd"],
            f"host {settings.host}: systemd is not running here, and labfleet runs dockerd as a systemd service",
        ),
        (
            packages is not None,
            f"host {settings.host}: Debian {major} ({codename}) ships only Compose v1, and labfleet needs "
            "`docker compose` (v2); use docker_source = 'docker-ce' (Docker's repository has the "
            "docker-compose-plugin), or list a Compose v2 package from your own mirror in docker_packages",
        ),
        (
            daemon_json["error"] is None,
            f"host {settings.host}: {DAEMON_JSON} is not valid JSON ({daemon_json['error']}); labfleet left it "
            "untouched; fix it by hand (python3 -m json.tool shows where), then run the deploy again",
        ),
        (
            not mixed,
            f"host {settings.host}: {', '.join(mixed)} mixes Docker's apt entries with other repositories'; "
            "labfleet does not edit other repositories' files: move Docker's entries out (labfleet writes "
            f"{SOURCES_FILE}), then run the deploy again",
        ),
        *(
            (
                name in group["accounts"],
                f"host {settings.host}: docker_users names {name!r}, which has no account on this host; "
                "create it (adduser) or remove it from docker_users",
            )
            for name in settings.docker_users
        ),
    ]
    failed = [problem for ok, problem in checks if not ok]
    require(name="Check that Docker can be installed here", ok=not failed, problem="; ".join(failed))
    if failed:
        return

    # Each operation below is planned only when the state read above says it has work;
    # each then reads its own facts again when it runs, so it stays correct on its own.
    planned = []
    conflicts = [name for name in conflicting_packages(settings, packages) if name in installed]
    if conflicts:
        planned.append(
            apt.remove_packages(name="Remove packages that conflict with the Docker source", packages=conflicts)
        )
    for path in stale:
        planned.append(files.file(name=f"Remove Docker's stale apt file {path}", path=path, present=False))

    sources, keyring = [], None
    if settings.docker_source == "docker-ce":
        prerequisites = ["ca-certificates"] + ([] if {"curl", "wget"} & set(installed) else ["curl"])
        if apt.missing_packages(prerequisites, installed):
            planned.append(apt.ensure_packages(name="Install ca-certificates and curl", packages=prerequisites))
        # Always planned: only the host can tell whether the served key changed. A new key
        # alone changes neither the packages nor the engine.
        keyring = apt.install_keyring(
            name="Install Docker's repository key", url=f"{repository_url(settings, distro)}/gpg", path=KEYRING
        )
        wanted_files = {SOURCES_FILE: ("Add Docker's apt repository", sources_file(settings, distro, codename, arch))}
        if settings.docker_version is not None:
            wanted_files[PIN_FILE] = (
                f"Pin Docker Engine to {settings.docker_version}",
                apt.pin_preferences(
                    PINNED["docker-ce"],
                    settings.docker_version,
                    comment="Written by labfleet (docker_version): keeps apt upgrade from moving the engine.",
                ),
            )
        for path, (title, text) in wanted_files.items():
            if apt_files["sha256"].get(path) != _sha256(text):
                sources.append(files.put(name=title, src=StringIO(text), dest=path, mode="644"))
    planned += sources

    if not group["exists"]:
        # Before the packages, so that the engine's socket is group-owned from its first start.
        planned.append(server.group(name="Create the docker group", group=DOCKER_GROUP, system=True))
    if apt.missing_packages(packages, installed) or planned:
        planned.append(
            apt.ensure_packages(
                name="Install Docker Engine packages",
                packages=packages,
                refresh=lambda: any(op.did_change() for op in [*sources, keyring] if op is not None),
            )
        )

    wanted_keys = daemon_config(settings, daemon_extra)
    current = daemon_json["config"] if daemon_json["present"] else {}
    if merged_daemon_json(current, wanted_keys) != current:
        daemon = merge_daemon_json(name=f"Merge settings into {DAEMON_JSON}", keys=wanted_keys)
        planned.append(daemon)
        planned.append(
            restart_service(
                name="Restart dockerd for its new daemon.json", service=DOCKER_SERVICE, _if=daemon.did_change
            )
        )
    if planned or service["active"] != "active" or service["enabled"] != "enabled":
        planned.append(ensure_service(name="Start and enable dockerd", service=DOCKER_SERVICE))
    for name in members:
        if name not in group["members"]:
            planned.append(add_to_group(name=f"Add {name} to the docker group", user=name, group=DOCKER_GROUP))

    known = None if planned else engine
    if worth_planning(bool(known and known["server"] and _is_compose_v2(known["compose"]))):
        check_engine(name="Check that docker info answers and docker compose is v2", known=known)
