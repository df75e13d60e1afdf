"""JupyterLab projects: one compose project per jupyter user, under /opt/labfleet/<user>."""

from __future__ import annotations

import hashlib
import shlex
from io import StringIO

from pyinfra import host, logger
from pyinfra.api import deploy, operation
from pyinfra.facts.files import File
from pyinfra.operations import files

from labfleet import compose, image, nvidia, preflight
from labfleet.facts.jupyter import ComposeService
from labfleet.facts.system import PathStates, path_is
from labfleet.planning import changed_in_this_run, plan_unless_current, planned, prefetch, worth_planning
from labfleet.settings import Settings

SECRET_MODE = 600


@operation(is_idempotent=True)
def secret_token(path: str, user: str, group: str, known_current: bool = False):
    """Generate a random token once, on the host, and keep it.

    + path: the token file
    + user: owner (the container reads it as this UID)
    + group: group owner
    + known_current: the state read while planning showed the token in place, with this
      owner and mode; the file is then not read again unless this run changed the host

    The token is made by the host itself, so it never travels through pyinfra's output
    or arguments; an existing token is never rotated, only its owner and mode mended.
    """
    if known_current and not changed_in_this_run():
        host.noop(f"token {path} exists and is kept")
        return
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
            out.append(compose.Project(settings, user, int(account["uid"]), int(account["gid"]), gpu, tag))
    return out


def _project_paths(directory: str) -> tuple[str, ...]:
    return tuple(
        f"{directory}/{name}" for name in (compose.TOKEN_SECRET, compose.PASSWORD_SECRET, "compose.yaml", ".env")
    )


def _state_parts(users, tag: str) -> tuple:
    paths = [compose.APP_ROOT]
    uploads = []
    for user in users:
        directory = compose.project_directory(user.name)
        token, password, *written = _project_paths(directory)
        paths += [user.workspace_dir, directory, token, password, *written]
        uploads += [password, *written]
    return (
        (PathStates, {"paths": tuple(paths), "digests": tuple(uploads)}),
        *((ComposeService, {"project": compose.project_name(user.name), "image": tag}) for user in users),
    )


def state_parts(settings: Settings) -> tuple:
    """The facts the projects are decided from while planning; they need no account, so they can
    be read in the same round trip as the accounts themselves."""
    return _state_parts(settings.jupyter_users, image.image_tag(settings))


def planned_state(projects: list[compose.Project]) -> tuple[dict, list[dict]]:
    """``(path states, [ComposeService per project])`` as read while planning, in one round trip.

    Both steps of this module decide from it: an operation it shows current is still
    planned, but reads nothing when it runs unless this run changed the host before it.
    """
    parts = _state_parts([project.user for project in projects], projects[0].image if projects else "")
    prefetch(parts)
    (states_fact, states_kwargs), *services = parts
    return planned(states_fact, **states_kwargs), [planned(cls, **kwargs) for cls, kwargs in services]


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _directory(states: dict, name: str, path: str, user: str, group: str, mode: str):
    """files.directory, which reads nothing when it runs if planning found the path as wanted."""
    return plan_unless_current(
        files.directory,
        path_is(states, path, "directory", user, group, mode),
        name=name,
        path=path,
        user=user,
        group=group,
        mode=mode,
    )


@deploy("Write the JupyterLab compose projects")
def write_projects(settings: Settings):
    mine = projects(settings)
    states, _ = planned_state(mine)
    _directory(states, f"Create {compose.APP_ROOT}", compose.APP_ROOT, "root", "root", "755")
    for project in mine:
        user = project.user.name
        group = preflight.account(settings, user)["group"]
        token, password_file, compose_file, env_file = _project_paths(project.directory)
        _directory(states, f"Create the workspace of {user}", project.user.workspace_dir, user, group, "750")
        _directory(states, f"Create the compose project of {user}", project.directory, "root", "root", "755")
        token_current = path_is(states, token, "file", user, group, SECRET_MODE)
        if worth_planning(token_current):
            secret_token(
                name=f"Keep the Jupyter token of {user}",
                path=token,
                user=user,
                group=group,
                known_current=token_current,
            )
        if settings.jupyter_password_hash:
            text = settings.jupyter_password_hash + "\n"
            plan_unless_current(
                files.put,
                path_is(states, password_file, "file", user, group, "600", _sha1(text)),
                name=f"Write the Jupyter password hash of {user}",
                src=StringIO(text),
                dest=password_file,
                user=user,
                group=group,
                mode="600",
            )
        else:
            plan_unless_current(
                files.file,
                password_file not in states,
                name=f"Remove the unused password hash of {user}",
                path=password_file,
                present=False,
            )
        text = compose.render_compose(project)
        plan_unless_current(
            files.put,
            path_is(states, compose_file, "file", "root", "root", "644", _sha1(text)),
            name=f"Write compose.yaml of {user}",
            src=StringIO(text),
            dest=compose_file,
            user="root",
            group="root",
            mode="644",
        )
        text = compose.render_env(project)
        plan_unless_current(
            files.put,
            path_is(states, env_file, "file", "root", "root", "600", _sha1(text)),
            name=f"Write .env of {user}",
            src=StringIO(text),
            dest=env_file,
            user="root",
            group="root",
            mode="600",
        )


# Jupyter prints its URLs with the token; logs shown on failure must not carry it.
HIDE_TOKENS = "sed -E 's/(token=)[^&[:space:]]+/\\1<hidden>/g'"


def is_current(state: dict, digest: str) -> bool:
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
    known_current: bool = False,
    new_token: bool = False,
):
    """Bring a compose project up, and wait until it is healthy, only when it is not current.

    + directory: the compose project directory
    + project: the compose project name
    + image: the image tag the project runs
    + digest: the config digest the current container must carry
    + timeout: seconds to wait for healthy
    + known_current: the state read while planning showed the project current and healthy;
      it is then not read again unless this run changed the host before this operation
    + new_token: the token file was missing while planning, so this run makes a new one; the
      container is recreated, since a bind-mounted file that was replaced keeps showing the
      container the old one, and the token in the file would not open JupyterLab

    Current means running the image id the tag names, with this config digest, and
    healthy. On failure the last log lines are shown, with tokens hidden, and only this
    host fails.
    """
    if known_current and not new_token and not changed_in_this_run():
        host.noop(f"{project} is up, current and healthy")
        return
    state = host.get_fact(ComposeService, project=project, image=image)
    if state["image_id"] is None:
        yield f"echo {shlex.quote(f'labfleet: image {image} is missing on this host')} >&2; exit 1"
        return
    current = is_current(state, digest)
    if current and state["health"] == "healthy" and not new_token:
        host.noop(f"{project} is up, current and healthy")
        return
    recreate = " --force-recreate" if new_token or (current and state["health"] == "unhealthy") else ""
    yield (
        f"cd {shlex.quote(directory)} && "
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


def tunnel_hint(settings: Settings, port: int) -> str:
    if settings.jupyter_bind in ("127.0.0.1", "::1"):
        return f"ssh -L {port}:127.0.0.1:{port} {settings.host}"
    return "no tunnel needed"


@deploy("Bring JupyterLab up")
def bring_up(settings: Settings):
    mine = projects(settings)
    states, services = planned_state(mine)
    for project, state in zip(mine, services, strict=True):
        model = compose.compose_model(project)
        digest = model["services"]["jupyterlab"]["labels"][compose.CONFIG_LABEL]
        token, *_ = _project_paths(project.directory)
        new_token = token not in states  # write_projects makes it in this run
        current = is_current(state, digest) and state["health"] == "healthy" and not new_token
        if worth_planning(current):
            compose_up(
                name=f"Bring up JupyterLab of {project.user.name}",
                directory=project.directory,
                project=project.name,
                image=project.image,
                digest=digest,
                known_current=current,
                new_token=new_token,
            )


@deploy("Summary")
def announce_projects(settings: Settings):
    for project in projects(settings):
        port = project.user.port
        secret = (
            "the password behind jupyter_password_hash"
            if settings.jupyter_password_hash
            else f"token in {project.directory}/{compose.TOKEN_SECRET}"
        )
        announce(
            name=f"How {project.user.name} reaches JupyterLab",
            message=(
                f"JupyterLab of {project.user.name}: http://127.0.0.1:{port}/lab "
                f"(tunnel: {tunnel_hint(settings, port)}; {secret})"
            ),
        )
