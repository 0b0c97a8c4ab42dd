"""``python -m bhvit ...``: the same as the ``bhvit`` command."""

import sys

from .cli import main

sys.exit(main())
