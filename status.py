"""labfleet status: are the machines still identical? Read-only; changes nothing.

    ./run status                                                   # the same as the next line
    pyinfra inventory.py status.py                                 # a table, drift marked with !
    ./run status --json                                            # the same as JSON, for scripts
    ./run status --verify       # also compare every synced dataset with its source, byte for byte
    LABFLEET_STATUS_FORMAT=json pyinfra inventory.py status.py

One row per host: OS, Docker, toolkit and driver versions, GPUs, the image and whether it
is the fleet's, each JupyterLab container's health and URL, the datasets' sync state and
the free disk. Below the hosts, one line per GPU (where a host has nvidia-smi): its load and
memory, and the lab users whose containers hold compute processes on it (labfleet/gpu_usage.py).
Drift (a host that differs from the fleet or from its settings, or cannot be reached) exits
non-zero; labfleet/report.py says what counts.
"""

from pyinfra import host

from labfleet import report
from labfleet.settings import for_host

report.collect(for_host(host))
