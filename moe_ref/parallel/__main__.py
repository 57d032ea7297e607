"""`python -m moe_ref.parallel` / `torchrun ... -m moe_ref.parallel`: runs moe_ref.parallel.cli.main.

Legend: T tokens, D d_model, E experts, K top-k, P ranks (the CLI's own options set them; see --help).
"""

import sys

from moe_ref.parallel.cli import main

if __name__ == "__main__":
    sys.exit(main())
