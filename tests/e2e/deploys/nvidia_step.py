"""The NVIDIA and docker steps of deploy.py, in its order, without datasets, image or Jupyter.

tests/e2e/test_nvidia.py runs it: the image's GPU check (nvidia.verify_gpu) needs a GPU
and the lab image, which the stand-in toolkit cannot provide.
"""

from pyinfra import host

from labfleet import certs, docker, nvidia, nvidia_driver, planning, preflight
from labfleet.settings import for_host

settings = for_host(host)

# As deploy.py: one round trip reads what these steps decide from.
planning.read_ahead(
    preflight.reads(settings),
    certs.reads(settings),
    nvidia.reads(settings),
    nvidia_driver.reads(settings),
    docker.reads(settings),
)

preflight.check_host(settings)
nvidia_driver.check_driver(settings)
toolkit = nvidia.install_container_toolkit(settings)
docker.ensure_docker_engine(
    settings, daemon_extra=[nvidia.daemon_keys(settings)], daemon_drop=nvidia.daemon_keys_to_drop(settings)
)
nvidia.configure_container_runtime(settings, toolkit)
nvidia.check_gpu_architecture(settings)
