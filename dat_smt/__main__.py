"""``python -m dat_smt``: the ``dat-smt`` command line."""
import sys

from .cli import main

sys.exit(main())
