"""``python -m comneck_server`` is ``comneck-server``."""

import sys

from .cli import main

sys.exit(main())
