"""An S3-compatible server for the tests and benches of s3: datasets: moto's server mode on the
controller's 127.0.0.1, on a free port, with a boto3 client to fill its buckets.

The hosts reach it through SSH remote forwards (tunnel.py); nothing leaves the loopback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def moto_s3(key_id: str, secret: str) -> Iterator[tuple[int, Any]]:
    """Yields (port, boto3 client with these keys); the server stops on the way out."""
    # Imported here: moto and boto3 are test and bench requirements, not the controller's.
    import boto3
    from moto.server import ThreadedMotoServer

    # One log line per request would bury a failure's report.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        # The controller's own CA settings are for the outside world; this endpoint is plain http.
        client = boto3.client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )
        yield port, client
    finally:
        server.stop()
