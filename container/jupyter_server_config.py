"""labfleet's Jupyter server settings, read by `jupyter lab` from /etc/jupyter.

Credentials come from files that compose mounts as secrets (JUPYTER_TOKEN_FILE, and
JUPYTER_PASSWORD_HASH_FILE for an argon2 hash). They are read here, when the server starts,
so they never sit in an environment variable, `docker inspect`, or the image.
"""

import os
import sys
from pathlib import Path

c = get_config()  # noqa: F821 (injected by traitlets when it loads this file)

c.ServerApp.ip = "0.0.0.0"  # inside the container; the host publishes it on jupyter_bind
c.ServerApp.port = 8888
c.ServerApp.port_retries = 0  # a busy port is an error, never a silent move to 8889
c.ServerApp.open_browser = False
c.ServerApp.root_dir = os.environ.get("WORKSPACE_DIR", "/workspace")
# Labs are often offline: no update checks or news fetched from the internet.
c.LabApp.check_for_updates_class = "jupyterlab.NeverCheckForUpdate"
c.LabApp.news_url = None


def _read_secret(variable: str) -> str | None:
    path = os.environ.get(variable)
    if not path:
        return None
    try:
        value = Path(path).read_text().strip()
    except OSError as error:
        # traitlets would log a config error and go on; stopping is safer than starting
        # with credentials other than the ones the admin set.
        sys.exit(f"labfleet: cannot read {variable}={path} as uid {os.getuid()}: {error.strerror}")
    if not value:
        sys.exit(f"labfleet: {variable}={path} is empty; expected the secret in it")
    return value


token = _read_secret("JUPYTER_TOKEN_FILE")
if token is not None:
    c.IdentityProvider.token = token


def cull_settings(text: str | None) -> dict[str, int | bool]:
    """MappingKernelManager's culling traits for jupyter_cull_idle, given in seconds (0 or unset: off).

    A forgotten kernel keeps its GPU memory until it ends, and the browser tab it was opened
    from is often still open somewhere: so connected kernels are culled too. A kernel that runs
    a cell is never culled (cull_busy stays False): that is running work. The check runs every
    5 minutes, or twice per timeout when that is shorter.
    """
    if not text:
        return {}
    if not text.isdigit():
        sys.exit(f"labfleet: JUPYTER_CULL_IDLE_SECONDS={text!r} is not a number of seconds")
    seconds = int(text)
    if seconds == 0:
        return {}
    return {
        "cull_idle_timeout": seconds,
        "cull_interval": max(1, min(300, seconds // 2)),
        "cull_connected": True,
        "cull_busy": False,
    }


for trait, value in cull_settings(os.environ.get("JUPYTER_CULL_IDLE_SECONDS")).items():
    setattr(c.MappingKernelManager, trait, value)

password_hash = _read_secret("JUPYTER_PASSWORD_HASH_FILE")
if password_hash is not None:
    if not password_hash.startswith("argon2:"):
        sys.exit("labfleet: JUPYTER_PASSWORD_HASH_FILE holds no argon2 hash; expected argon2:$argon2id$...")
    c.PasswordIdentityProvider.hashed_password = password_hash
