"""JupyterLab projects: one compose project per jupyter user, under /opt/labfleet/<user>."""

from __future__ import annotations

import shlex
from io import StringIO

from pyinfra import host
from pyinfra.api import deploy, operation
from pyinfra.facts.files import File
from pyinfra.operations import files

from labfleet import compose, image, nvidia, preflight
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
        account = preflight.account(user.name)
        if account is not None:
            out.append(compose.Project(settings, user, int(account["uid"]), int(account["gid"]), gpu, tag))
    return out


@deploy("Write the JupyterLab compose projects")
def write_projects(settings: Settings):
    files.directory(name=f"Create {compose.APP_ROOT}", path=compose.APP_ROOT, user="root", group="root", mode="755")
    for project in projects(settings):
        user = project.user.name
        group = preflight.account(user)["group"]
        files.directory(
            name=f"Create the workspace of {user}",
            path=project.user.workspace_dir,
            user=user,
            group=group,
            mode="750",
        )
        files.directory(
            name=f"Create the compose project of {user}",
            path=project.directory,
            user="root",
            group="root",
            mode="755",
        )
        secret_token(
            name=f"Keep the Jupyter token of {user}",
            path=f"{project.directory}/{compose.TOKEN_SECRET}",
            user=user,
            group=group,
        )
        password_file = f"{project.directory}/{compose.PASSWORD_SECRET}"
        if settings.jupyter_password_hash:
            files.put(
                name=f"Write the Jupyter password hash of {user}",
                src=StringIO(settings.jupyter_password_hash + "\n"),
                dest=password_file,
                user=user,
                group=group,
                mode="600",
            )
        else:
            files.file(name=f"Remove the unused password hash of {user}", path=password_file, present=False)
        files.put(
            name=f"Write compose.yaml of {user}",
            src=StringIO(compose.render_compose(project)),
            dest=f"{project.directory}/compose.yaml",
            user="root",
            group="root",
            mode="644",
        )
        files.put(
            name=f"Write .env of {user}",
            src=StringIO(compose.render_env(project)),
            dest=f"{project.directory}/.env",
            user="root",
            group="root",
            mode="600",
        )
