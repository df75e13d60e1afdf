"""Throwaway CA certificates, for tests of extra_ca_certificates."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed_ca(directory: Path, common_name: str) -> str:
    """Make a one-day self-signed CA certificate with the controller's openssl; return its path."""
    stem = common_name.lower().replace(" ", "-")
    key, cert = directory / f"{stem}.key", directory / f"{stem}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={common_name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert)
