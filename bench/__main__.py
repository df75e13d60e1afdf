"""`python -m bench`: the whole deploy against its floor (bench/run.py)."""

import sys

from bench.run import main

sys.exit(main())
