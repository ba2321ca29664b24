"""`python -m vlm_prune ...` runs the `vlm-prune` command (see `vlm_prune.cli`)."""

import sys

from vlm_prune.cli import main

if __name__ == "__main__":
    sys.exit(main())
