"""bench/migrate.py's deploy: the steps a migration needs (preflight, the datasets step that makes
the old PC's sync account, the migration), read ahead in one round trip per host as deploy.py does."""

from pyinfra import host

from labfleet import certs, datasets, migrate, planning, preflight
from labfleet.settings import for_host

settings = for_host(host)
planning.read_ahead(preflight.reads(settings), certs.reads(settings), datasets.reads(settings), migrate.reads(settings))
preflight.check_host(settings)
datasets.lay_out_datasets(settings)
migrate.pull_user_files(settings)
