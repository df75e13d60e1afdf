"""`image_delivery: registry`: push once, every host pulls; and the lab's own registry host.

A host in the inventory group `registry` runs the distribution's `docker-registry` (the
CNCF distribution registry). The image reaches it once, the way `ship` delivers, and it
pushes to itself on loopback, so the controller needs nothing but SSH: no route to the
registry port and no change to the controller's own engine. Every other host pulls the tag
from `image_registry` and keeps it only if its image id, the content hash of the image
config and so of every layer, is the id the controller built.

Trust, for a LAN-only registry: plain HTTP, listed under `insecure-registries` in each
host's daemon.json (through the docker step's merge). Anyone on the LAN could read the
image, and a machine that can spoof the registry's address could offer another one, which
the id check then refuses. TLS would protect the transport, at the price of a certificate
on the registry and its CA on every host (`extra_ca_certificates`); labs that need it can
put a TLS proxy in front and drop the insecure entry.
"""

from __future__ import annotations

import shlex
import subprocess
from io import StringIO
from typing import cast

import yaml
from pyinfra import host
from pyinfra.api import operation
from pyinfra.operations import files

from labfleet import apt, archives, docker, progress, shipping
from labfleet.facts.image import ImageId
from labfleet.facts.registry import RegistryHasTag
from labfleet.planning import current_run, step
from labfleet.settings import Settings

CONFIG = "/etc/docker/registry/config.yml"
SERVICE = "docker-registry.service"
PUSH_LOG = "/var/tmp/labfleet-push.log"
PULL_LOG = "/var/tmp/labfleet-pull.log"


def daemon_keys(settings: Settings) -> dict:
    """daemon.json keys the pulling hosts need: the registry is plain HTTP on the LAN."""
    if settings.image_delivery != "registry":
        return {}
    return {"insecure-registries": [settings.image_registry]}


def registry_ref(registry: str, tag: str) -> str:
    return f"{registry}/{tag}"


def registry_address(settings: Settings) -> str:
    """image_registry: validation (checks.py) refuses registry delivery without one."""
    return cast(str, settings.image_registry)


def local_port(settings: Settings) -> int:
    return int(settings.registry_listen.rsplit(":", 1)[1])


def config(settings: Settings) -> str:
    document = {
        "version": 0.1,
        "log": {"fields": {"service": "registry"}},
        "storage": {"filesystem": {"rootdirectory": settings.registry_storage}, "delete": {"enabled": False}},
        "http": {"addr": settings.registry_listen, "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    return "# Managed by labfleet (registry_listen, registry_storage).\n" + yaml.safe_dump(document, sort_keys=False)


@operation(is_idempotent=True)
def push(tag: str, port: int, here: bool = True):
    """Push tag from this host's engine to the registry on its own loopback.

    + tag: the image tag
    + port: the registry's port
    + here: whether this host is the registry (every host calls the operation, see deliver)
    """
    if not here:
        host.noop("the registry host pushes")
        return
    if host.get_fact(RegistryHasTag, port=port, tag=tag):
        host.noop(f"the registry already serves {tag}")
        return
    local = shlex.quote(registry_ref(f"127.0.0.1:{port}", tag))
    log = shlex.quote(PUSH_LOG)
    # Without a terminal, docker prints one line per layer and state: the log is the progress.
    yield progress.WatchedCommand(
        f"docker tag {shlex.quote(tag)} {local} && "
        f"{{ docker push {local} >{log} 2>&1 || {{ cat {log} >&2; false; }}; }}; "
        f"rc=$?; rm -f {log}; docker rmi {local} >/dev/null; exit $rc",
        what=f"Push {tag}",
        unit="layers",
        question=progress.layers_question(log),
        answer=progress.layers_answer,
    )


@operation(is_idempotent=True)
def pull(registry: str, tag: str, image_id: str, here: bool = True):
    """Pull tag from the registry and keep it only if it is image_id.

    + registry: host:port of the registry
    + tag: the image tag
    + image_id: the id the controller built
    + here: whether this host pulls (the registry host has the image already)
    """
    if not here:
        host.noop("the registry host has the image")
        return
    if host.get_fact(ImageId, ref=tag) == image_id:
        host.noop(f"{tag} is already {image_id[:19]}")
        return
    remote = shlex.quote(registry_ref(registry, tag))
    check = f"docker image inspect --format '{{{{.Id}}}}' {remote}"
    refused = shlex.quote(f"labfleet: {registry} served {tag} with another image id than {image_id}; not used")
    log = shlex.quote(PULL_LOG)
    yield progress.WatchedCommand(
        f"ok=1; {{ docker pull {remote} >{log} 2>&1 || {{ cat {log} >&2; rm -f {log}; false; }}; }} && rm -f {log} && "
        f'if [ "$({check})" = {shlex.quote(image_id)} ]; then docker tag {remote} {shlex.quote(tag)}; ok=0; '
        f"else echo {refused} >&2; ok=1; fi; docker rmi {remote} >/dev/null; exit $ok",
        what=f"Pull {tag}",
        unit="layers",
        question=progress.layers_question(log),
        answer=progress.layers_answer,
    )


@step("Provision the lab registry")
def provision(settings: Settings):
    apt.ensure_packages(name="Install docker-registry", packages=["docker-registry", "curl"])
    files.directory(name="Create the registry storage", path=settings.registry_storage, mode="755")
    written = files.put(
        name="Write the registry's config",
        src=StringIO(config(settings)),
        dest=CONFIG,
        mode="644",
    )
    docker.restart_service(name="Restart the registry", service=SERVICE, _if=written.did_change)
    docker.ensure_service(name="Start and enable the registry", service=SERVICE)


def push_from_controller(settings: Settings, tag: str) -> None:
    """With no registry host in the inventory, the controller's engine pushes, once per run."""
    remote = registry_ref(registry_address(settings), tag)

    def push() -> str:
        tagged = subprocess.run(["docker", "tag", tag, remote], capture_output=True, text=True, check=False)
        if tagged.returncode != 0:
            raise RuntimeError(f"`docker tag {tag} {remote}` failed: {tagged.stderr.strip()}")
        returncode, output = progress.run_on_controller(
            ["docker", "push", remote], f"Push {tag}", "layers", progress.layers_answer
        )
        if returncode != 0:
            raise RuntimeError(f"`docker push {remote}` failed: {output.strip()}")
        return remote

    current_run().once(f"pushed {remote}", push)


@step("Deliver the image through the registry")
def deliver(settings: Settings, tag: str):
    # pyinfra orders operations by how they follow each other on every host, not by the
    # code's lines, so every host calls push and then pull (each a no-op where it does not
    # apply): that is what makes every pull wait for the registry host's push.
    image_id = archives.controller().image_id(tag)
    if settings.is_registry:
        provision(settings)
        shipping.ship(settings, tag)
    elif not any("registry" in getattr(h, "groups", ()) for h in host.inventory):
        push_from_controller(settings, tag)
    push(name="Push the image to the lab registry", tag=tag, port=local_port(settings), here=settings.is_registry)
    pull(
        name="Pull the image from the lab registry",
        registry=registry_address(settings),
        tag=tag,
        image_id=image_id,
        here=not settings.is_registry,
    )
