"""Example overrides for the hosts listed in the `gpu` group of inventory.py.

Group files override group_data/all.py; host data in inventory.py overrides both."""

# These machines certainly have GPUs: don't rely on detection.
gpu = True
# Give JupyterLab every GPU of the machine.
gpu_devices = "all"
