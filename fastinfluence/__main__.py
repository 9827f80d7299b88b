"""``python -m fastinfluence``: the same program as the ``fastinfluence`` command."""

import sys

from .cli import main

sys.exit(main())
