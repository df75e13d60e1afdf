"""One wheel cache on the controller that every test image build reads.

A cold suite builds the lab image many times (each changed context, each forced rebuild,
each worker), and every build used to fetch the same locked wheels from the index again.
Here they are fetched once per machine, with `pip download` of the profile's hash-locked
requirements for the image's own Python and platform, into a directory that outlives the
run. Builds read it through `labfleet.image.build_image(wheels=...)`: a find-links URL on
127.0.0.1 with the index switched off. pip still checks every hash, so the image is the
one the index would have given, under the same tag.

Every pytest process serves the same directory on the same port (SO_REUSEPORT), so the URL,
which is part of the build's layer-cache key, is the same for every worker and every run,
and a worker that finishes first leaves the others served.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

from .engine import CommandFailed, docker, run_command
from .images import image_lock

CACHE_ENV = "LABFLEET_TEST_WHEEL_CACHE"  # another directory for the cache
DOWNLOAD_TIMEOUT_S = 1800
# The base port; each user gets their own so that two users' runs never share a server.
BASE_PORT = 41000

# What pip must be told to download wheels for the image's Python rather than the controller's.
_IMAGE_TAGS = r"""
import json, os, platform, sys
libc = os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")
print(json.dumps({"python": "%d.%d" % sys.version_info[:2], "glibc": libc[:2], "machine": platform.machine()}))
"""


def cache_dir() -> Path:
    """Where the wheels live: on disk (/var/tmp), per user, kept between runs."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    scratch = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
    return Path(scratch) / f"labfleet-test-wheels-{os.getuid()}"


@functools.cache
def image_platform(base: str) -> dict:
    """The Python version, glibc and machine of the base image, read by running it once."""
    answer = docker("run", "--rm", "--entrypoint", "python3", base, "-c", _IMAGE_TAGS, timeout=120)
    return json.loads(answer.stdout)


def fill(locks: list[Path], base: str, directory: Path | None = None) -> Path:
    """Download every wheel the locks name, for base's Python, into the cache; return it.

    A marker per lock and platform makes a warm run skip pip altogether; pip itself skips a
    wheel that is already there with the right hash.
    """
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = image_platform(base)
    major, minor = target["glibc"]
    for lock in locks:
        digest = hashlib.sha256(lock.read_bytes() + json.dumps(target, sort_keys=True).encode()).hexdigest()[:16]
        marker = directory / f".filled-{digest}"
        with image_lock(f"wheel-cache-{os.getuid()}"):
            if marker.exists():
                continue
            python = target["python"].replace(".", "")
            argv = [
                sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                "--require-hashes", "--no-deps", "--only-binary=:all:",
                "--python-version", target["python"], "--implementation", "cp",
                "--abi", f"cp{python}", "--abi", "abi3", "--abi", "none",
                *(arg for tag in _platforms(int(major), int(minor), target["machine"]) for arg in ("--platform", tag)),
                "--dest", str(directory), "--requirement", str(lock),
            ]  # fmt: skip
            # The controller's own pip settings (a constraints file, extra find-links) are not
            # the image's: the lock alone decides, as it does inside the build.
            env = {key: value for key, value in os.environ.items() if key not in _CONTROLLER_ONLY}
            try:
                run_command(argv, timeout=DOWNLOAD_TIMEOUT_S, env=env)
            except CommandFailed as error:
                raise CommandFailed(
                    f"filling the test wheel cache {directory} from {lock} failed; the index must be reachable "
                    f"from this machine (or set {CACHE_ENV} to a directory that holds the wheels):\n{error}"
                ) from None
            marker.touch()
    return directory


def _platforms(major: int, minor: int, machine: str) -> list[str]:
    """Every manylinux tag a glibc major.minor runs, newest first: pip widens only the legacy names."""
    if major != 2:
        raise CommandFailed(f"the test wheel cache knows glibc 2.x only, not {major}.{minor}")
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags = []
    for older in range(minor, 4, -1):
        tags.append(f"manylinux_2_{older}_{machine}")
        if older in legacy:
            tags.append(f"{legacy[older]}_{machine}")
    return [*tags, f"linux_{machine}"]


_CONTROLLER_ONLY = {"PIP_CONSTRAINT", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        """Silent: one line per wheel per build would bury the test output."""


class _ReusePortServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


@contextlib.contextmanager
def serve(directory: Path):
    """Serve directory on 127.0.0.1 while the block runs; yield its find-links URL.

    The port is fixed per user, so that the URL stays the same from run to run; when
    something else holds it, any free port serves instead (builds then miss the layer cache).
    """
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = _ReusePortServer(("127.0.0.1", BASE_PORT + os.getuid() % 10000), handler)
    except OSError:
        server = _ReusePortServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="wheel-cache", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def lock_files(profile: str, context: Path) -> list[Path]:
    """The profile's locks in a container/ directory (one per CUDA line, or one for all)."""
    return sorted((context / "requirements").glob(f"{profile}*.txt"))
