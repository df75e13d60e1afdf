"""Docker Engine on every host: packages, apt source, daemon.json, service, docker group.

``ensure_docker_engine(settings, daemon_extra=...)`` is the docker step of deploy.py. It
decides everything from facts, so a second run changes nothing:

1. Stops this host, before changing anything, when the distribution is not Debian or
   Ubuntu, when /etc/docker/daemon.json is not valid JSON, when a docker_users account is
   missing, or when an apt file mixes Docker's entries with another repository's.
2. Removes the packages that conflict with the chosen source (only those installed; a
   package named in docker_packages is never removed) and Docker's stale apt files: an
   old docker.list or a second key, which make apt fail with "Conflicting values set for
   option Signed-By". Files of other repositories are never touched. (Steps 2 and 3 are
   labfleet.apt's repository step, the one the NVIDIA toolkit uses too.)
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
   result with ``dockerd --validate`` where the engine has it, and, only when the parsed
   config changed, reloads dockerd (SIGHUP) when every changed key is one it reloads, or
   restarts it otherwise. ``live-restore: true`` is among the wanted keys unless the file
   sets live-restore by hand (a hand-set false stays, with a warning on every run), so a
   restart, once live-restore is on in the running engine, keeps every container running.
   Starts and enables the service.
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
``ensure_docker_engine(settings, daemon_extra=[nvidia_runtime.daemon_keys(settings)])``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FileUploadCommand, operation
from pyinfra.facts.deb import DebArch, DebPackages
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import server

from labfleet import apt, planning, platform
from labfleet.facts.apt import AptFiles
from labfleet.facts.docker import AppArmorEnabled, DaemonJson, DaemonJsonState, DockerEngineStatus, EngineStatus
from labfleet.facts.system import GroupMembers, ServiceState, UnitState
from labfleet.planning import Read, step
from labfleet.preflight import failing_command, require
from labfleet.settings import Settings

DAEMON_JSON = "/etc/docker/daemon.json"
DOCKER_GROUP = "docker"
DOCKER_SERVICE = "docker.service"
# What names Docker's own repository in an apt entry, wherever it came from.
UPSTREAM_MARKER = "download.docker.com/linux/"


# Docker's apt repository as labfleet keeps it; its markers come from the settings (repository()).
REPOSITORY = apt.AptRepository(
    name="docker",
    owner="Docker",
    product="Docker Engine",
    markers=(UPSTREAM_MARKER,),
    # Where Docker's install guides, older guides and other tools have put Docker's key.
    key_files=(
        f"{apt.KEYRING_DIR}/docker.gpg",
        f"{apt.KEYRING_DIR}/docker-archive-keyring.gpg",
        "/usr/share/keyrings/docker.gpg",
        "/usr/share/keyrings/docker.asc",
        "/usr/share/keyrings/docker-archive-keyring.gpg",
        "/etc/apt/trusted.gpg.d/docker.gpg",
        "/etc/apt/trusted.gpg.d/docker.asc",
        "/etc/apt/trusted.gpg.d/docker-archive-keyring.gpg",
    ),
    pin_packages=platform.DOCKER_PINNED["docker-ce"],
    sources_comment="Docker's apt repository; written by labfleet (docker_source, docker_apt_mirror).",
    pin_comment="Written by labfleet (docker_version): keeps apt upgrade from moving the engine.",
)


def repository(settings: Settings) -> apt.AptRepository:
    """Docker's repository, recognised upstream and at docker_apt_mirror."""
    return replace(REPOSITORY, markers=repository_markers(settings))


def repository_url(settings: Settings, distro: str) -> str:
    return f"{settings.docker_apt_mirror}/{distro}"


def repository_markers(settings: Settings) -> tuple[str, ...]:
    """URL fragments that identify an apt entry as Docker's: upstream, or the configured
    mirror for either distribution (known before the host's release is read)."""
    markers = [UPSTREAM_MARKER]
    for distro in platform.FAMILIES:
        mirror = repository_url(settings, distro).split("://", 1)[-1]
        markers += [mirror + "/", mirror + " "]
    return tuple(dict.fromkeys(markers))


def apt_source(settings: Settings, release: platform.Distribution, arch: str) -> apt.AptSource | None:
    """What docker.sources says on this host; None with docker_source "distro" (no repository)."""
    if settings.docker_source != "docker-ce":
        return None
    url = repository_url(settings, release.id)
    return apt.AptSource(
        uris=url,
        suites=release.codename,
        components="stable",
        architectures=arch,
        key_url=f"{url}/gpg",
        pin_version=settings.docker_version,
    )


def packages_to_install(
    settings: Settings, release: platform.Distribution, apparmor: bool = False, curl: bool = False
) -> tuple[str, ...] | None:
    """docker_packages (or the source's defaults), with docker_version applied; None: no Compose v2 here.

    curl: add curl, through which every later run reads the engine's state (facts.docker_api).
    """
    listed = settings.docker_packages
    if listed is None:
        listed = platform.docker_packages(settings.docker_source, release)
        if listed is None:
            return None
    packages = []
    for package in listed:
        name, version = apt.split_version(package)
        if version is None and settings.docker_version and name in platform.DOCKER_PINNED[settings.docker_source]:
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
    return tuple(name for name in platform.DOCKER_CONFLICTS[settings.docker_source] if name not in keep)


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


def merged_daemon_json(current: Mapping, wanted: Mapping, drop: Mapping | None = None) -> dict:
    """The file's content after the merge: every key set by hand survives.

    + drop: top-level keys that labfleet wrote and no longer wants, each with the value it
      wrote; one is removed only while it still has that value and wanted does not set it
      (so a value changed by hand, or asked for in docker_daemon, stays)
    """
    merged = deep_merge(current, wanted)
    for key, value in (drop or {}).items():
        if key not in wanted and merged.get(key) == value:
            del merged[key]
    return merged


# What dockerd takes up on SIGHUP (``systemctl reload``) without stopping anything: Docker's
# "configuration reload behavior" list, checked against moby's daemon/reload.go and
# reload_unix.go (reloadPlatform) and the authorization plugins that dockerd's reload sets.
# "features" is left out: it reloads, but a feature such as containerd-snapshotter acts only
# at start. Any other key changed needs a restart.
RELOADABLE_KEYS = frozenset(
    {
        "allow-nondistributable-artifacts",
        "authorization-plugins",
        "debug",
        "default-runtime",
        "default-shm-size",
        "insecure-registries",
        "labels",
        "live-restore",
        "max-concurrent-downloads",
        "max-concurrent-uploads",
        "max-download-attempts",
        "registry-mirrors",
        "runtimes",
        "shutdown-timeout",
    }
)
LIVE_RESTORE = "live-restore"
# How long a reload may take to show before the host fails (dockerd applies it in milliseconds).
RELOAD_WAIT_S = 30.0
POLL_S = 0.25


def live_restore_keys(current: Mapping) -> dict:
    """live-restore on, unless the host's daemon.json sets it by hand (docker_daemon still wins over both).

    With live-restore, containers keep running while dockerd restarts, for a daemon.json
    change or an engine upgrade; without it every running kernel on the host dies.
    """
    return {} if LIVE_RESTORE in current else {LIVE_RESTORE: True}


def live_restore_warning(settings: Settings, current: Mapping) -> str | None:
    """The warning for a host whose daemon.json turns live-restore off by hand; None otherwise."""
    if current.get(LIVE_RESTORE) is not False or LIVE_RESTORE in settings.docker_daemon:
        return None
    return (
        f'host {settings.host}: {DAEMON_JSON} sets "live-restore": false by hand, so every restart of dockerd '
        "(a daemon.json change, an engine upgrade) stops all containers here, running kernels included; "
        "labfleet leaves it as it is; to keep containers running, delete the key there or set docker_daemon = "
        '{"live-restore": true}, then run the deploy again'
    )


def changed_keys(before: Mapping, after: Mapping) -> list[str]:
    """The top-level daemon.json keys whose values differ (added or removed keys included)."""
    missing = object()
    return sorted(key for key in before.keys() | after.keys() if before.get(key, missing) != after.get(key, missing))


def restart_keys(before: Mapping, after: Mapping) -> list[str]:
    """The changed keys that dockerd takes up only when it restarts.

    A removed key is one of them even where dockerd reloads it: a reload applies only the
    keys the new file sets (moby's reload checks ``IsValueSet``), so a running dockerd
    would keep, for example, the ``default-runtime`` that the file no longer names.
    """
    return [key for key in changed_keys(before, after) if key not in RELOADABLE_KEYS or key not in after]


def engine_action(before: Mapping, after: Mapping, active: bool) -> str:
    """How dockerd takes up a new daemon.json: "none", "start" (it is not running), "reload" or "restart"."""
    if before == after:
        return "none"
    if not active:
        return "start"
    return "restart" if restart_keys(before, after) else "reload"


def apply_daemon_json_command(
    host_name: str, service: str, before: Mapping, after: Mapping, active: bool, wait_s: float = RELOAD_WAIT_S
) -> str | None:
    """The shell command that makes a running dockerd take up after (None: nothing to do).

    A reload waits until dockerd reports it (its "reload" event). A restart with live-restore
    wanted first makes sure the running dockerd has it on, by a reload when it does not yet
    (``docker info``), so that the restart keeps every container running.
    """
    action = engine_action(before, after, active)
    unit = shlex.quote(service)
    tries = max(1, round(wait_s / POLL_S))
    if action == "none":
        return None
    if action == "start":
        return f"systemctl restart {unit}"
    if action == "reload":
        unconfirmed = shlex.quote(
            f"labfleet: host {host_name}: dockerd did not confirm reloading {DAEMON_JSON} within {wait_s:g} s, "
            "so its new settings may not be in effect; its containers keep running; see journalctl -u docker "
            f"for why, fix it, then run systemctl reload {service}"
        )
        return (
            f"t=$(date +%s.%N); systemctl reload {unit} || exit 1; i=0; "
            'until [ -n "$(docker events --since "$t" --until "$(date +%s.%N)" --filter type=daemon '
            "--filter event=reload --format '{{.Action}}' 2>/dev/null)\" ]; do i=$((i+1)); "
            f"if [ $i -ge {tries} ]; then echo {unconfirmed} >&2; exit 1; fi; sleep {POLL_S:g}; done"
        )
    if after.get(LIVE_RESTORE) is not True:
        return f"systemctl restart {unit}"
    no_live_restore = shlex.quote(
        f"labfleet: host {host_name}: dockerd did not turn live-restore on within {wait_s:g} s of a reload, so "
        f"labfleet did not restart it (that would stop every container); {DAEMON_JSON} has the new settings "
        f"({', '.join(restart_keys(before, after))} need a restart); see journalctl -u docker for why, then "
        f"run systemctl restart {service} yourself when its containers may stop"
    )
    live = "[ \"$(docker info --format '{{.LiveRestoreEnabled}}' 2>/dev/null)\" = true ]"
    return (
        f"if ! {live}; then systemctl reload {unit} || exit 1; i=0; until {live}; do i=$((i+1)); "
        f"if [ $i -ge {tries} ]; then echo {no_live_restore} >&2; exit 1; fi; sleep {POLL_S:g}; done; fi; "
        f"systemctl restart {unit}"
    )


@operation(is_idempotent=True)
def merge_daemon_json(
    keys: dict, path: str = DAEMON_JSON, service: str | None = DOCKER_SERVICE, drop: dict | None = None
):
    """Merge keys into Docker's daemon.json, validated, and make dockerd take it up with the least disruption.

    + keys: the daemon.json keys to set; nested mappings merge key by key
    + path: the daemon.json to merge into
    + service: dockerd's unit, reloaded or restarted for the new file; None: only write it
    + drop: keys labfleet wrote earlier and no longer wants, with the value it wrote
      (``merged_daemon_json``)

    The parsed JSON is compared, so a file that differs only in formatting is left alone.
    A file that is not valid JSON stops this host and is left untouched. The new file is
    checked with ``dockerd --validate`` (Docker 23 and later) before it is moved in place.
    When every changed key is one that dockerd reloads on SIGHUP, dockerd is reloaded, and
    nothing stops; otherwise it is restarted, after a reload that turns live-restore on
    where the file wants it, so that the containers keep running. A stopped engine is started.

    **Example:**

    .. code:: python

        merge_daemon_json(name="Log rotation", keys={"log-driver": "local"})
    """
    current = host.get_fact(DaemonJson, path=path)
    if current["error"]:
        yield failing_command(invalid_daemon_json(host.name, path, current["error"]))
        return
    existing = (current["config"] or {}) if current["present"] else {}
    merged = merged_daemon_json(existing, keys, drop)
    if current["present"] and merged == existing:
        host.noop(f"{path} already has the wanted keys")
        return
    if not current["present"] and not merged:
        host.noop(f"nothing to write to {path}")
        return
    yield f"install -d -m 755 {shlex.quote(path.rsplit('/', 1)[0] or '/')}"
    yield FileUploadCommand(StringIO(json.dumps(merged, indent=2) + "\n"), staged_path(path))
    yield validate_and_replace_command(host.name, path)
    if service is not None:
        active = host.get_fact(ServiceState, service=service)["active"] == "active"
        apply = apply_daemon_json_command(host.name, service, existing, merged, active)
        if apply:
            yield apply


def staged_path(path: str) -> str:
    return f"{path}.labfleet-new"


def validate_and_replace_command(host_name: str, path: str) -> str:
    """Check the staged file with ``dockerd --validate`` where dockerd has it, then move it in place."""
    q_path, q_staged = shlex.quote(path), shlex.quote(staged_path(path))
    rejected = shlex.quote(
        f"labfleet: host {host_name}: dockerd rejects the merged {path} (its reason is above); the running engine "
        f"and {path} are unchanged; fix docker_daemon (or the key set by hand there), then run the deploy again"
    )
    return (
        f"if dockerd --help 2>/dev/null | grep -q -- --validate; then "
        f"dockerd --validate --config-file={q_staged} || {{ rm -f {q_staged}; echo {rejected} >&2; exit 1; }}; fi; "
        f"chown root:root {q_staged} && chmod 644 {q_staged} && mv -f {q_staged} {q_path}"
    )


@operation(is_idempotent=True)
def warn(message: str):
    """Print a warning for a person in the run's output, on every run; it changes nothing.

    + message: the one line to print

    **Example:**

    .. code:: python

        warn(name="Warn that live-restore is off", message="host pc01: ...")
    """
    if host.state.is_executing:
        logger.warning(f"{host.print_prefix}{message}")
    host.noop("warned")
    return
    yield  # an operation is a generator, even one that yields nothing


def invalid_daemon_json(host_name: str, path: str, error: str) -> str:
    return (
        f"host {host_name}: {path} is not valid JSON ({error}); labfleet left it untouched; "
        "fix it by hand (python3 -m json.tool shows where), then run the deploy again"
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
def check_engine():
    """Check that ``docker info`` answers and that ``docker compose version`` reports v2; change nothing.

    Healthy: a no-op. Otherwise the host runs the check itself, giving a starting engine
    up to 60 s, and fails with what is wrong.

    **Example:**

    .. code:: python

        check_engine(name="Check the engine")
    """
    status = host.get_fact(DockerEngineStatus)
    if engine_is_healthy(status):
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


def engine_is_healthy(status: Mapping) -> bool:
    """From DockerEngineStatus: the engine answers and Compose is v2."""
    return bool(status["server"]) and _is_compose_v2(status["compose"])


def docker_group_members(settings: Settings) -> list[str]:
    return sorted(set(settings.docker_users) | {user.name for user in settings.jupyter_users})


@dataclass(frozen=True)
class DockerHost:
    """What the docker step decides from, read once per host while planning (``reads``)."""

    release: dict
    arch: str
    apparmor: bool
    packages: dict[str, list[str]]
    apt_files: AptFiles
    daemon_json: DaemonJsonState
    service: UnitState
    engine: EngineStatus
    group: dict


def reads(settings: Settings) -> dict[str, Read]:
    """The facts the docker step decides from, by DockerHost field."""
    return {
        "release": Read(LinuxDistribution),
        "arch": Read(DebArch),
        "apparmor": Read(AppArmorEnabled),
        "packages": Read(DebPackages),
        "apt_files": apt.repository_read(repository(settings)),
        "daemon_json": Read(DaemonJson, {"path": DAEMON_JSON}),
        "service": Read(ServiceState, {"service": DOCKER_SERVICE}),
        "engine": Read(DockerEngineStatus),
        "group": Read(GroupMembers, {"group": DOCKER_GROUP, "users": tuple(docker_group_members(settings))}),
    }


def problems(
    settings: Settings,
    state: DockerHost,
    release: platform.Distribution,
    packages: tuple[str, ...] | None,
    mixed: list[str],
) -> list[str]:
    """Everything that stops this host before the docker step changes anything on it."""
    checks = [
        (
            state.service["systemd"],
            f"host {settings.host}: systemd is not running here, and labfleet runs dockerd as a systemd service",
        ),
        (
            packages is not None,
            f"host {settings.host}: Debian {release.major} ({release.codename}) ships only Compose v1, and labfleet "
            "needs `docker compose` (v2); use docker_source = 'docker-ce' (Docker's repository has the "
            "docker-compose-plugin), or list a Compose v2 package from your own mirror in docker_packages",
        ),
        (
            state.daemon_json["error"] is None,
            invalid_daemon_json(settings.host, DAEMON_JSON, state.daemon_json["error"] or ""),
        ),
        (not mixed, apt.mixed_problem(repository(settings), settings.host, mixed)),
        *(
            (
                name in state.group["accounts"],
                f"host {settings.host}: docker_users names {name!r}, which has no account on this host; "
                "create it (adduser) or remove it from docker_users",
            )
            for name in settings.docker_users
        ),
    ]
    return [problem for ok, problem in checks if not ok]


@step("Install Docker Engine")
def ensure_docker_engine(settings: Settings, daemon_extra: Iterable[Mapping] = (), daemon_drop: Mapping | None = None):
    """Docker Engine from the configured source, with the merged daemon.json, running and checked.

    + settings: this host's Settings
    + daemon_extra: daemon.json keys from later steps (NVIDIA runtime, registries), merged
      under docker_daemon into one write and at most one restart
    + daemon_drop: keys a later step wrote earlier and no longer wants, with the value it
      wrote (``nvidia_runtime.daemon_keys_to_drop``), removed in the same write
    """
    state = planning.snapshot(DockerHost, reads(settings))
    title = "Check that Docker can be installed here"
    try:
        release = platform.distribution(state.release)
    except platform.UnsupportedDistribution as error:
        require(
            name=title,
            ok=False,
            problem=f"host {settings.host}: {error}; labfleet installs Docker on Debian 12/13 and Ubuntu 22.04/24.04",
        )
        return
    installed = state.packages
    packages = packages_to_install(
        settings, release, apparmor=state.apparmor and "apparmor" not in installed, curl="curl" not in installed
    )
    docker_repo, source = repository(settings), apt_source(settings, release, state.arch)
    failed = problems(settings, state, release, packages, apt.mixed_files(docker_repo, source, state.apt_files))
    require(name=title, ok=not failed, problem="; ".join(failed))
    if failed or packages is None:
        return

    conflicts = conflicting_packages(settings, packages)
    planning.unless_current(
        apt.remove_packages,
        current=not any(name in installed for name in conflicts),
        name="Remove packages that conflict with the Docker source",
        packages=conflicts,
    )
    repository_changed = apt.add_repository(docker_repo, source, state.apt_files, installed)
    # Before the packages, so that the engine's socket is group-owned from its first start.
    planning.unless_current(
        server.group, current=state.group["exists"], name="Create the docker group", group=DOCKER_GROUP, system=True
    )
    planning.unless_current(
        apt.ensure_packages,
        current=not apt.missing_packages(packages, installed),
        name="Install Docker Engine packages",
        packages=packages,
        refresh=repository_changed,
    )

    current = (state.daemon_json["config"] or {}) if state.daemon_json["present"] else {}
    wanted_keys = daemon_config(settings, [live_restore_keys(current), *daemon_extra])
    drop = {key: value for key, value in (daemon_drop or {}).items() if key not in wanted_keys}
    planning.unless_current(
        merge_daemon_json,
        current=merged_daemon_json(current, wanted_keys, drop) == current,
        name=f"Merge settings into {DAEMON_JSON} and reload or restart dockerd",
        keys=wanted_keys,
        service=DOCKER_SERVICE,
        drop=drop,
    )
    warning = live_restore_warning(settings, current)
    if warning:
        planning.notice(warn, name="Warn that live-restore is off by hand", message=warning)
    planning.unless_current(
        ensure_service,
        current=(state.service["active"], state.service["enabled"]) == ("active", "enabled"),
        name="Start and enable dockerd",
        service=DOCKER_SERVICE,
    )
    for name in docker_group_members(settings):
        planning.unless_current(
            add_to_group,
            current=name in state.group["members"],
            name=f"Add {name} to the docker group",
            user=name,
            group=DOCKER_GROUP,
        )
    planning.unless_current(
        check_engine,
        current=engine_is_healthy(state.engine),
        name="Check that docker info answers and docker compose is v2",
    )
