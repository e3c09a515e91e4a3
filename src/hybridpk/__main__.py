"""``python -m hybridpk`` runs the command-line interface."""

import sys

from hybridpk.cli import main

sys.exit(main())
