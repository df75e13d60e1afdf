"""labfleet status: are the machines still identical? Read-only; changes nothing.

    pyinfra inventory.py status.py                                 # a table, drift marked with !
    LABFLEET_STATUS_FORMAT=json pyinfra inventory.py status.py     # the same as JSON

Drift (a host that differs from the fleet, or an unhealthy container) exits non-zero.
"""

from pyinfra import host

from labfleet import report
from labfleet.settings import for_host

report.collect(for_host(host))
