"""Datasets: one directory layout on every host, never deleted."""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.operations import files

from labfleet.settings import Settings


@deploy("Lay out the dataset directories")
def lay_out_datasets(settings: Settings):
    # Only directories are created: files.directory never recurses, so nothing that
    # already lives under the datasets root is touched.
    files.directory(
        name=f"Create the datasets root {settings.datasets_root}",
        path=settings.datasets_root,
        user="root",
        group="root",
        mode="755",
    )
    for dataset in settings.datasets:
        files.directory(
            name=f"Create dataset directory {dataset.name}",
            path=f"{settings.datasets_root}/{dataset.name}",
            mode="755",
        )
