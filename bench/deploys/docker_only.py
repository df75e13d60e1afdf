"""The docker step of deploy.py alone: what bench/docker_noop.py compares with its floor."""

from pyinfra import host

from labfleet import docker
from labfleet.settings import for_host

docker.ensure_docker_engine(for_host(host))
