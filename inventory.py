"""Which machines labfleet manages.

List lab hosts in the groups below; each group may have a group_data/<group>.py with
overrides. A host is a name, or (name, {data}) for per-host settings such as
ssh_user or jupyter_port. With no host listed, labfleet manages this machine (@local).

    workstations = ["pc01.lab", ("pc02.lab", {"ssh_user": "admin", "jupyter_port": 8890})]
    gpu = ["pc01.lab", "pc02.lab"]   # group_data/gpu.py applies to these
    registry = ["nas.lab"]           # the lab's image registry (image_delivery = "registry")
"""

import os

from labfleet.dataset_listing import list_datasets_ahead
from labfleet.settings import check_inventory_groups

# Lab workstations reached over SSH.
workstations = []
# Hosts that certainly have NVIDIA GPUs (see group_data/gpu.py).
gpu = []
# The lab's registry host, for image_delivery = "registry".
registry = []

if not (workstations or gpu or registry):
    # This machine; sudo when the deploy is not already run as root.
    workstations = [("@local", {"_sudo": os.geteuid() != 0})]

# pyinfra skips a group that is not a list without a word; stop with an error instead.
check_inventory_groups(globals(), groups=("workstations", "gpu", "registry"))
# The controller lists its local: datasets while pyinfra connects (labfleet/dataset_listing.py).
list_datasets_ahead()
