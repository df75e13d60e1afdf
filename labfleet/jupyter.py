"""JupyterLab projects: one compose project per jupyter user, under /opt/labfleet/<user>."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from pyinfra import host, logger
from pyinfra.api import operation
from pyinfra.facts.files import File
from pyinfra.operations import files

from labfleet import compose, image, migrate, nvidia, planning, preflight, snapshot_files, updates
from labfleet.facts.home import FileNames
from labfleet.facts.jupyter import ComposeService, ComposeState
from labfleet.facts.system import PathState, PathStates, path_is
from labfleet.facts.updates import ContainerBusy
from labfleet.planning import Read, step, unless_current
from labfleet.settings import Settings

SECRET_MODE = 600


@operation(is_idempotent=True)
def secret_token(path: str, user: str, group: str):
    """Generate a random token once, on the host, and keep it.

    + path: the token file
    + user: owner (the container reads it as this UID)
    + group: group owner

    The token is made by the host itself, so it never travels through pyinfra's output
    or arguments; an existing token is never rotated, only its owner and mode mended.

    **Example:**

    .. code:: python

        secret_token(name="Keep alice's token", path="/opt/labfleet/alice/jupyter_token", user="alice", group="alice")
    """
    info = host.get_fact(File, path=path)
    owner = f"{shlex.quote(user)}:{shlex.quote(group)}"
    if info is False:
        yield f"echo {shlex.quote(f'labfleet: {path} exists and is not a file; move it away')} >&2; exit 1"
        return
    if info is None:
        directory = shlex.quote(path.rsplit("/", 1)[0])
        yield (
            f"umask 077 && tmp=$(mktemp {directory}/.token.XXXXXX) && "
            'od -An -N32 -tx1 /dev/urandom | tr -d " \\n" > "$tmp" && '
            f'chown {owner} "$tmp" && mv "$tmp" {shlex.quote(path)}'
        )
        return
    if (info["user"], info["group"]) != (user, group):
        yield f"chown {owner} {shlex.quote(path)}"
    if info["mode"] != SECRET_MODE:
        yield f"chmod {SECRET_MODE} {shlex.quote(path)}"
    if (info["user"], info["group"], info["mode"]) == (user, group, SECRET_MODE):
        host.noop(f"token {path} exists and is kept")


def projects(settings: Settings) -> list[compose.Project]:
    """The compose projects of this host; users without an account are left out (preflight stops the host)."""
    tag = image.image_tag(settings)
    gpu = nvidia.has_gpu(settings)
    out = []
    for user in settings.jupyter_users:
        account = preflight.account(settings, user.name)
        if account is not None:
            ids = int(account["uid"]), int(account["gid"])
            out.append(compose.Project(settings, user, *ids, gpu, tag, group_name=account["group"]))
    return out


def _project_paths(directory: str) -> tuple[str, ...]:
    names = (compose.TOKEN_SECRET, compose.PASSWORD_SECRET, "compose.yaml", ".env", compose.KEEP_HOME)
    return tuple(f"{directory}/{name}" for name in names)


def reads(settings: Settings) -> dict[str, Read]:
    """What the projects are decided from: their files, and each user's container and the tag's image.

    None of it needs an account, so it is read in the same round trip as the accounts.
    """
    paths = [compose.APP_ROOT]
    uploads = []
    for user in settings.jupyter_users:
        directory = compose.project_directory(user.name)
        token, password, *written = _project_paths(directory)
        secrets = [_secret_path(user.name, name) for name, _ in user.secrets]
        paths += [user.workspace_dir, user.home_dir, compose.secrets_directory(user.name), directory, token, password]
        paths += [*written, *secrets]
        uploads += [password, *written, *secrets]
    tag = image.image_tag(settings)
    return {
        "paths": Read(PathStates, {"paths": tuple(paths), "digests": tuple(uploads)}),
        **home_reads(settings),
        **{
            f"service {user.name}": Read(ComposeService, {"project": compose.project_name(user.name), "image": tag})
            for user in settings.jupyter_users
        },
    }


@dataclass(frozen=True)
class ProjectsState:
    """The projects' files, and each jupyter user's container (by user name), as planning read them."""

    paths: dict[str, PathState]
    services: dict[str, ComposeState]

    @property
    def image_id(self) -> str | None:
        """The id the lab image's tag names on the host (each container reading asks for it too)."""
        return next((service["image_id"] for service in self.services.values()), None)


def host_state(settings: Settings) -> ProjectsState:
    found = planning.read(reads(settings))
    services = {user.name: found[f"service {user.name}"] for user in settings.jupyter_users}
    return ProjectsState(paths=found["paths"], services=services)


@step("Write the JupyterLab compose projects")
def write_projects(settings: Settings):
    states = host_state(settings).paths
    snapshot_files.directory(states, f"Create {compose.APP_ROOT}", compose.APP_ROOT, "root", "root", "755")
    for project in projects(settings):
        user = project.user.name
        group = project.group
        token, password_file, compose_file, env_file, keep_home = _project_paths(project.directory)
        snapshot_files.directory(
            states, f"Create the workspace of {user}", project.user.workspace_dir, user, group, "750"
        )
        snapshot_files.directory(
            states, f"Create the compose project of {user}", project.directory, "root", "root", "755"
        )
        _write_home_and_secrets(settings, project, states)
        unless_current(
            secret_token,
            current=path_is(states, token, "file", user, group, SECRET_MODE),
            name=f"Keep the Jupyter token of {user}",
            path=token,
            user=user,
            group=group,
        )
        if settings.jupyter_password_hash:
            text = settings.jupyter_password_hash + "\n"
            snapshot_files.text_file(
                states, f"Write the Jupyter password hash of {user}", text, password_file, user, group, "600"
            )
        else:
            unless_current(
                files.file,
                current=password_file not in states,
                name=f"Remove the unused password hash of {user}",
                path=password_file,
                present=False,
            )
        text = compose.render_compose(project)
        snapshot_files.text_file(states, f"Write compose.yaml of {user}", text, compose_file, "root", "root", "644")
        snapshot_files.text_file(
            states, f"Write .env of {user}", compose.render_env(project), env_file, "root", "root", "600"
        )
        text = keep_home_script(project.name, user, project.user.home_dir)
        snapshot_files.text_file(states, f"Write the HOME keeper of {user}", text, keep_home, "root", "root", "755")


def _secret_path(user: str, name: str) -> str:
    return f"{compose.secrets_directory(user)}/{name}"


def home_reads(settings: Settings) -> dict[str, Read]:
    """Per user: which secret files the host holds (one no longer set is removed, so it is exported no more)."""
    reads = {}
    for user in settings.jupyter_users:
        reads[f"secret files {user.name}"] = Read(FileNames, {"path": compose.secrets_directory(user.name)})
    return reads


def home_copy_command(project: str, user: str, home_dir: str) -> str:
    """The shell command that copies a container's own HOME into home_dir, never replacing a file.

    `docker cp` reads a running or a stopped container alike. Owners are kept by number: the
    container's user has the host account's UID and GID, so the copies belong to that account.
    The copy streams through tar; nothing is staged.
    """
    source = shlex.quote(f"{compose.container_name(project)}:{compose.container_home(user)}/.")
    script = (
        f"set -o pipefail; docker cp {source} - | "
        f"tar -C {shlex.quote(home_dir)} -xpf - --numeric-owner --skip-old-files"
    )
    return f"bash -c {shlex.quote(script)}"


def keep_home_script(project: str, user: str, home_dir: str) -> str:
    """The project's keep-home script: run right before its container is recreated.

    A container from before home_dir keeps HOME in its own layer, which the recreate throws
    away, so what it holds there is copied into home_dir first, never replacing a file. It
    runs at the recreate itself (by compose_up, or by the update timer once the container is
    idle), so whatever the user wrote until then is kept too. A container that never started,
    or whose HOME is already a mount, has nothing to keep.
    """
    container = compose.container_name(project)
    found = "{{.State.StartedAt}} {{range .Mounts}}{{.Destination}} {{end}}"
    return (
        "#!/bin/sh\n"
        f"# Written by labfleet: run before {container} is recreated; keeps what it holds in its own HOME.\n"
        "set -eu\n"
        f"found=$(docker inspect --format {shlex.quote(found)} {shlex.quote(container)} 2>/dev/null) || exit 0\n"
        'case "$found" in 0001-01-01T00:00:00Z*) exit 0;; esac\n'
        f'case " $found " in *" {compose.container_home(user)} "*) exit 0;; esac\n'
        f"exec {home_copy_command(project, user, home_dir)}\n"
    )


def _write_home_and_secrets(settings: Settings, project: compose.Project, states: dict[str, PathState]) -> None:
    user, group = project.user.name, project.group
    found = planning.read(home_reads(settings))
    # Made once, 0700: only the directory itself is owned and moded, never what is in it.
    snapshot_files.directory(states, f"Create the home of {user}", project.user.home_dir, user, group, "700")
    directory = compose.secrets_directory(user)
    if project.user.secrets or directory in states:
        snapshot_files.directory(states, f"Create the secrets directory of {user}", directory, "root", "root", "700")
    for name, local in project.user.secrets:
        dest = _secret_path(user, name)
        snapshot_files.controller_file(
            states, f"Write the secret {name} of {user}", local, dest, user, group, str(SECRET_MODE)
        )
    wanted = {name for name, _ in project.user.secrets}
    for stale in found[f"secret files {user}"]:
        if stale not in wanted:
            unless_current(
                files.file,
                current=False,
                name=f"Remove the secret {stale} of {user}, no longer in jupyter_secrets",
                path=_secret_path(user, stale),
                present=False,
            )


# Jupyter prints its URLs with the token; logs shown on failure must not carry it.
HIDE_TOKENS = "sed -E 's/(token=)[^&[:space:]]+/\\1<hidden>/g'"


def is_current(state: ComposeState, digest: str) -> bool:
    """From ComposeService: running the image id the tag names, with this config digest."""
    return (
        state["image_id"] is not None
        and state["container_image"] == state["image_id"]
        and state["status"] == "running"
        and state["digest"] == digest
    )


@operation(is_idempotent=True)
def compose_up(
    directory: str,
    project: str,
    image: str,
    digest: str,
    timeout: int = 300,
    new_token: bool = False,
    update: str = "now",
    idle_seconds: int = 0,
    user: str = "",
):
    """Bring a compose project up, and wait until it is healthy, only when it is not current.

    + directory: the compose project directory
    + project: the compose project name
    + image: the image tag the project runs
    + digest: the config digest the current container must carry
    + timeout: seconds to wait for healthy
    + new_token: the token file was missing while planning, so this run makes a new one; the
      container is recreated, since a bind-mounted file that was replaced keeps showing the
      container the old one, and the token in the file would not open JupyterLab
    + update: "when-idle" keeps a running container whose kernels, terminals or GPU processes
      are busy (labfleet.updates); "now" recreates it whatever it runs
    + idle_seconds: how long every kernel must have been quiet, for "when-idle"
    + user: the jupyter user, named in the line that says the update waits

    Current means running the image id the tag names, with this config digest, and
    healthy. On failure the last log lines are shown, with tokens hidden, and only this
    host fails.
    """
    state = host.get_fact(ComposeService, project=project, image=image)
    if state["image_id"] is None:
        yield f"echo {shlex.quote(f'labfleet: image {image} is missing on this host')} >&2; exit 1"
        return
    current = is_current(state, digest)
    if current and state["health"] == "healthy" and not new_token:
        host.noop(f"{project} is up, current and healthy")
        return
    if update == "when-idle" and not new_token and updates.waits(state, digest):
        # A new token is the admin's own rotation (they deleted the file), so it never waits.
        busy = host.get_fact(ContainerBusy, container=compose.container_name(project), idle_seconds=idle_seconds)
        if busy["busy"]:
            line = updates.deferral_line(user or project, busy["reasons"], idle_seconds)
            if host.state.is_executing:  # once per run, also when pyinfra previews changes first
                logger.warning(f"{host.print_prefix}{line}")
            host.noop(line)
            return
    recreate = " --force-recreate" if new_token or (current and state["health"] == "unhealthy") else ""
    kept = shlex.quote(f"labfleet: copying {project}'s HOME into its home_dir failed; the container is left as it was")
    yield (
        f"cd {shlex.quote(directory)} && "
        f"{{ [ ! -x ./{compose.KEEP_HOME} ] || ./{compose.KEEP_HOME} || {{ echo {kept} >&2; exit 1; }}; }} && "
        f"docker compose up -d --wait --wait-timeout {int(timeout)}{recreate} 2>&1 || "
        f"{{ docker compose logs --no-color --tail 40 2>&1 | {HIDE_TOKENS} >&2; exit 1; }}"
    )


@operation(is_idempotent=True)
def announce(message: str):
    """Print a line for a person at the end of the run; it changes nothing."""
    logger.info(f"{host.print_prefix}{message}")
    host.noop(message)
    return
    yield  # an operation is a generator, even one that yields nothing


def reach_hint(settings: Settings, port: int) -> str:
    """How a person reaches the port from another machine: an SSH tunnel when it is bound to
    loopback, nothing to add on the machine itself (@local) or when it listens on the LAN."""
    if settings.host.startswith("@local") or settings.jupyter_bind not in ("127.0.0.1", "::1"):
        return ""
    return f"tunnel: ssh -L {port}:127.0.0.1:{port} {settings.host}; "


@step("Bring JupyterLab up")
def bring_up(settings: Settings):
    state = host_state(settings)
    updates.install_update_timers(settings)
    held = migrate.held_back(settings)
    for project in projects(settings):
        if project.user.name in held:
            continue  # moved to another PC, or not yet moved here (labfleet.migrate)
        service = state.services[project.user.name]
        digest = compose.project_digest(project)
        token, *_ = _project_paths(project.directory)
        new_token = token not in state.paths  # write_projects makes it in this run
        unless_current(
            compose_up,
            current=is_current(service, digest) and service["health"] == "healthy" and not new_token,
            name=f"Bring up JupyterLab of {project.user.name}",
            directory=project.directory,
            project=project.name,
            image=project.image,
            digest=digest,
            new_token=new_token,
            update=settings.jupyter_update,
            idle_seconds=settings.jupyter_update_idle,
            user=project.user.name,
        )
        updates.plan_update_timer(settings, project.user.name, service, digest, project.image)


@step("Summary")
def announce_projects(settings: Settings):
    held = migrate.held_back(settings)
    for project in projects(settings):
        if project.user.name in held:
            announce(name=f"How {project.user.name} reaches JupyterLab", message=held[project.user.name])
            continue
        port = project.user.port
        secret = (
            "the password behind jupyter_password_hash"
            if settings.jupyter_password_hash
            else f"token in {project.directory}/{compose.TOKEN_SECRET}"
        )
        announce(
            name=f"How {project.user.name} reaches JupyterLab",
            message=(
                f"JupyterLab of {project.user.name}: {compose.url(settings, port)} "
                f"({reach_hint(settings, port)}{secret})"
            ),
        )
