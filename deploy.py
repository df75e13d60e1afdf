"""labfleet: turn this inventory's machines into identical CUDA JupyterLab workstations.

    pyinfra inventory.py deploy.py

Every host's settings are validated before anything runs (labfleet/settings.py); then,
in order: preflight, datasets, JupyterLab projects.
"""

from pyinfra import host

from labfleet import datasets, jupyter, preflight
from labfleet.settings import for_host

settings = for_host(host)

preflight.check_host(settings)
datasets.lay_out_datasets(settings)
jupyter.write_projects(settings)
