"""``python -m comneck`` is ``comneck``."""

import sys

from .cli import main

sys.exit(main())
