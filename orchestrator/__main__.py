"""`python -m vsva` runs the same command line as the `vsva` console script."""

import sys

from vsva.cli.app import main

sys.exit(main())
