"""Test images built locally from debootstrap, tagged by a hash of their recipe and reused.

There is no registry to pull from, so every image starts as a debootstrap root file system
imported with `docker import`. Two kinds exist:

- host images, `labfleet-test/host:<distro>-<hash>`: systemd, sshd and a sudo user, built
  from tests/e2e/images/host/ on top of a debootstrap root;
- plain base images, `labfleet-test/debian:<distro>-<hash>`: a minbase root that image-build
  tests use as BASE_IMAGE. Built only when asked for.

The hash covers the recipe files and the debootstrap arguments, so editing either gives a new
tag, and an unchanged recipe reuses the image already in the engine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .engine import CommandFailed, docker, run_command, tail_lines
from .mirror import debian_mirror

RECIPES_DIR = Path(__file__).resolve().parent.parent / "images"
HOST_RECIPE_DIR = RECIPES_DIR / "host"
ENGINE_RECIPE_DIR = RECIPES_DIR / "engine"
HOST_REPOSITORY = "labfleet-test/host"
ROOTFS_REPOSITORY = "labfleet-test/rootfs"
BASE_REPOSITORY = "labfleet-test/debian"
IMAGE_LABEL = "labfleet.test.image"

DEBOOTSTRAP_TIMEOUT_S = 1200
BUILD_TIMEOUT_S = 900
LOCK_TIMEOUT_S = 2400

HOST_PACKAGES = "systemd,systemd-sysv,dbus,openssh-server,python3,sudo,iproute2,ca-certificates,procps,curl,gnupg,kmod"
BASE_PACKAGES = "ca-certificates,python3"

# systemd 256 and later (trixie has 257) refuse cgroup v1 unless forced; bookworm's 252 does not.
INIT_ARGS = {
    "trixie": "SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1 systemd.unified_cgroup_hierarchy=0",
    "bookworm": "",
}
DISTROS = tuple(INIT_ARGS)


@dataclass(frozen=True)
class Debootstrap:
    """What debootstrap is asked for; part of every image hash."""

    suite: str
    variant: str = "minbase"
    include: str = ""

    def args(self, target: str, mirror: str) -> list[str]:
        include = [f"--include={self.include}"] if self.include else []
        return [f"--variant={self.variant}", *include, self.suite, target, mirror]


def host_image(distro: str = "trixie") -> str:
    """Tag of the systemd+sshd host image for distro, built now if the engine lacks it."""
    _check_distro(distro)
    rootfs = Debootstrap(distro, include=HOST_PACKAGES)
    recipe_hash = _hash(rootfs, _recipe_files(HOST_RECIPE_DIR), INIT_ARGS[distro])
    tag = f"{HOST_REPOSITORY}:{distro}-{recipe_hash}"
    with image_lock(tag):
        if not image_exists(tag):
            rootfs_tag = _imported_rootfs(ROOTFS_REPOSITORY, rootfs)
            _build_host_layer(tag, rootfs_tag, distro)
    return tag


# What labfleet's docker step installs from the distribution (docker_source "distro").
ENGINE_PACKAGES = {"trixie": "docker.io docker-cli docker-compose docker-buildx"}


def engine_host_image(distro: str = "trixie") -> str:
    """The host image with the distribution's engine preinstalled, built now if missing."""
    if distro not in ENGINE_PACKAGES:
        raise ValueError(f"no engine host image for {distro}; one of {', '.join(ENGINE_PACKAGES)}")
    host = host_image(distro)
    recipe = {**_recipe_files(ENGINE_RECIPE_DIR), "packages": ENGINE_PACKAGES[distro].encode(), "host": host.encode()}
    tag = f"{HOST_REPOSITORY}:{distro}-engine-{_hash(Debootstrap(distro), recipe)}"
    with image_lock(tag):
        if not image_exists(tag):
            docker(
                "build", "--quiet", "--label", f"{IMAGE_LABEL}=1",
                "--build-arg", f"HOST={host}",
                "--build-arg", f"PACKAGES={ENGINE_PACKAGES[distro]}",
                "--tag", tag, str(ENGINE_RECIPE_DIR),
                timeout=BUILD_TIMEOUT_S, env={**os.environ, "DOCKER_BUILDKIT": "0"},
            )  # fmt: skip
    return tag


def base_image(distro: str = "trixie") -> str:
    """Tag of the plain minbase image for distro (BASE_IMAGE of image-build tests)."""
    _check_distro(distro)
    return _imported_rootfs(BASE_REPOSITORY, Debootstrap(distro, include=BASE_PACKAGES))


def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False, timeout=60).returncode == 0


def built_images() -> list[str]:
    """Every image this harness built, as repository:tag."""
    listed = docker(
        "image", "ls", "--filter", f"label={IMAGE_LABEL}=1", "--format",
        "{{.Repository}}:{{.Tag}}",
    )  # fmt: skip
    return sorted(line for line in listed.stdout.split() if not line.endswith(":<none>"))


def _imported_rootfs(repository: str, rootfs: Debootstrap) -> str:
    tag = f"{repository}:{rootfs.suite}-{_hash(rootfs)}"
    with image_lock(tag):
        if not image_exists(tag):
            _debootstrap_and_import(tag, rootfs)
    return tag


def _debootstrap_and_import(tag: str, rootfs: Debootstrap) -> None:
    workdir = tempfile.mkdtemp(prefix="labfleet-debootstrap-", dir=_scratch_dir())
    target = os.path.join(workdir, "rootfs")
    try:
        try:
            run_command(
                ["debootstrap", *rootfs.args(target, debian_mirror())],
                timeout=DEBOOTSTRAP_TIMEOUT_S,
            )
        except CommandFailed as error:
            log = Path(target, "debootstrap", "debootstrap.log")
            detail = tail_lines(log.read_text(errors="replace")) if log.exists() else ""
            raise CommandFailed(f"{error}\ndebootstrap.log:\n{detail}") from None
        _docker_import(target, tag)
    finally:
        _remove_tree(workdir)


def _docker_import(root: str, tag: str) -> None:
    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "-C", root, "-c", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        imported = subprocess.run(
            ["docker", "import", "--change", f"LABEL {IMAGE_LABEL}=1", "-", tag],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    finally:
        assert tar.stdout is not None and tar.stderr is not None  # both are pipes
        tar.stdout.close()
        tar_err = tar.stderr.read().decode(errors="replace")
        tar.wait(timeout=60)
    if tar.returncode != 0 or imported.returncode != 0:
        raise CommandFailed(
            f"importing {root} as {tag} failed (tar {tar.returncode}, docker import "
            f"{imported.returncode}):\n{tail_lines(tar_err)}\n{tail_lines(imported.stderr)}"
        )


def _build_host_layer(tag: str, rootfs_tag: str, distro: str) -> None:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    docker(
        "build", "--quiet", "--label", f"{IMAGE_LABEL}=1",
        "--build-arg", f"BASE={rootfs_tag}",
        "--build-arg", f"INIT_ARGS={INIT_ARGS[distro]}",
        "--tag", tag, str(HOST_RECIPE_DIR),
        timeout=BUILD_TIMEOUT_S, env=env,
    )  # fmt: skip


def _recipe_files(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*")) if path.is_file()
    }


def _hash(rootfs: Debootstrap, files: dict[str, bytes] | None = None, init_args="") -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([rootfs.suite, rootfs.variant, rootfs.include, init_args]).encode())
    for name, content in (files or {}).items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def image_lock(tag: str):
    """Serialise builds of one tag across pytest processes on this machine."""
    name = tag.replace("/", "_").replace(":", "_")
    path = os.path.join(tempfile.gettempdir(), f"labfleet-test-{name}.lock")
    with open(path, "a") as handle:
        _lock_with_deadline(handle.fileno(), LOCK_TIMEOUT_S, tag)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _lock_with_deadline(fd: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise CommandFailed(f"another process held the build lock for {what} over {timeout} s") from None
            time.sleep(1)


def _remove_tree(path: str) -> None:
    # debootstrap mounts /proc and /sys inside its target and may leave them mounted after a
    # failure; removing a tree with live mounts in it would reach into them.
    mounts = _mounts_under(path)
    for mount in sorted(mounts, key=len, reverse=True):
        run_command(["umount", "-l", mount], check=False, timeout=60)
    if _mounts_under(path):
        raise CommandFailed(f"left {path} in place: file systems are still mounted under it")
    shutil.rmtree(path, ignore_errors=True)


def _mounts_under(path: str) -> list[str]:
    root = os.path.realpath(path)
    with open("/proc/mounts") as handle:
        points = [line.split()[1].replace("\\040", " ") for line in handle]
    return [point for point in points if point == root or point.startswith(root + "/")]


def _scratch_dir() -> str:
    # /var/tmp is on disk; /tmp may be a small tmpfs, and a root file system is ~400 MB.
    return "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()


def _check_distro(distro: str) -> None:
    if distro not in INIT_ARGS:
        raise ValueError(f"unknown test distro {distro!r}; expected one of {', '.join(DISTROS)}")
