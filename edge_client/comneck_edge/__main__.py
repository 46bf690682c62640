"""``python -m comneck_edge`` is ``comneck-edge``."""

import sys

from .cli import main

sys.exit(main())
