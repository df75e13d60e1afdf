"""labfleet: turn this inventory's machines into identical CUDA JupyterLab workstations.

    pyinfra inventory.py deploy.py

Every host's settings are validated before anything runs (labfleet/settings.py); then,
in order: preflight (and the NVIDIA driver floor), the NVIDIA Container Toolkit (before
Docker, so that dockerd finds it when it starts), Docker Engine with the NVIDIA runtime,
datasets, the image, the JupyterLab projects written, users' files pulled from an old PC
(migrate_from), backups (and a restore_from, before JupyterLab starts), the projects brought
up healthy, the GPU seen inside the image, and a summary of how to reach them.
"""

from pyinfra import host

from labfleet import (
    backup,
    certs,
    datasets,
    delivery,
    docker,
    gpu_architecture,
    jupyter,
    migrate,
    nvidia,
    nvidia_driver,
    nvidia_runtime,
    planning,
    preflight,
    registry,
    restore,
    updates,
)
from labfleet.settings import for_host

settings = for_host(host)

# One round trip reads what every step decides from while planning (pyinfra plans every
# step before running any, so this is what each step would have read on its own).
planning.read_ahead(
    preflight.reads(settings),
    certs.reads(settings),
    nvidia.reads(settings),
    nvidia_driver.reads(settings),
    nvidia_runtime.reads(settings),
    gpu_architecture.reads(settings),
    docker.reads(settings),
    datasets.reads(settings),
    delivery.reads(settings),
    jupyter.reads(settings),
    updates.reads(settings),
    backup.reads(settings),
    restore.reads(settings),
    migrate.reads(settings),
)

preflight.check_host(settings)
nvidia_driver.check_driver(settings)
toolkit = nvidia.install_container_toolkit(settings)
docker.ensure_docker_engine(
    settings,
    daemon_extra=[registry.daemon_keys(settings), nvidia_runtime.daemon_keys(settings)],
    daemon_drop=nvidia_runtime.daemon_keys_to_drop(settings),
)
nvidia_runtime.configure_container_runtime(settings, toolkit)
gpu_architecture.check_gpu_architecture(settings)
datasets.lay_out_datasets(settings)
delivery.deliver_image(settings)
jupyter.write_projects(settings)
migrate.pull_user_files(settings)
backup.set_up_backups(settings)
restore.restore_workspaces(settings)
backup.schedule_backups(settings)
jupyter.bring_up(settings)
nvidia.verify_gpu(settings)
jupyter.announce_projects(settings)
