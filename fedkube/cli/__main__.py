"""`python -m fedkube.cli` (how fedkube starts its own processes)."""

import sys

from fedkube.cli.main import main

sys.exit(main())
