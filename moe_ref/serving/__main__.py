"""`python -m moe_ref.serving --check`: see moe_ref.serving.cli."""

import sys

from .cli import main

sys.exit(main())
