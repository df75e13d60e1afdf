"""The NVIDIA and docker steps of deploy.py, in its order, without datasets, image or Jupyter.

tests/e2e/test_nvidia.py runs it: the image's GPU check (nvidia.verify_gpu) needs a GPU
and the lab image, which the stand-in toolkit cannot provide.
"""

from pyinfra import host

from labfleet import certs, docker, gpu_architecture, nvidia, nvidia_driver, nvidia_runtime, planning, preflight
from labfleet.settings import for_host

settings = for_host(host)

# As deploy.py: one round trip reads what these steps decide from.
planning.read_ahead(
    preflight.reads(settings),
    certs.reads(settings),
    nvidia.reads(settings),
    nvidia_driver.reads(settings),
    nvidia_runtime.reads(settings),
    gpu_architecture.reads(settings),
    docker.reads(settings),
)

preflight.check_host(settings)
nvidia_driver.check_driver(settings)
toolkit = nvidia.install_container_toolkit(settings)
docker.ensure_docker_engine(
    settings,
    daemon_extra=[nvidia_runtime.daemon_keys(settings)],
    daemon_drop=nvidia_runtime.daemon_keys_to_drop(settings),
)
nvidia_runtime.configure_container_runtime(settings, toolkit)
gpu_architecture.check_gpu_architecture(settings)
