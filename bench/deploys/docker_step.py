"""The deploy that bench/docker_noop.py times: preflight and the docker step of deploy.py, nothing else."""

from pyinfra import host

from labfleet import docker, preflight
from labfleet.settings import for_host

settings = for_host(host)

preflight.check_host(settings)
docker.ensure_docker_engine(settings)
