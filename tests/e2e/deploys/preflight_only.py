"""The preflight step of deploy.py alone: settings, accounts and extra CA certificates."""

from pyinfra import host

from labfleet import preflight
from labfleet.settings import for_host

preflight.check_host(for_host(host))
