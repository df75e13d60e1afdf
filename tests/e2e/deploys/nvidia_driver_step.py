"""Preflight, the NVIDIA driver step and the image's GPU check of deploy.py, in its order.

tests/e2e/test_nvidia_driver.py runs it: a host that must reboot into its driver skips the
GPU check, which needs no image then; the toolkit and Docker have their own tests.
"""

from pyinfra import host

from labfleet import certs, nvidia, nvidia_driver, planning, preflight
from labfleet.settings import for_host

settings = for_host(host)

# As deploy.py: one round trip reads what these steps decide from.
planning.read_ahead(
    preflight.reads(settings), certs.reads(settings), nvidia.reads(settings), nvidia_driver.reads(settings)
)

preflight.check_host(settings)
nvidia_driver.check_driver(settings)
nvidia.verify_gpu(settings)
