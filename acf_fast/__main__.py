"""`python -m acf_fast ...` runs the `acf-fast` command line."""

import sys

from .pipeline.cli import main

sys.exit(main())
