"""``python -m slimlm``: the command line."""
import sys

from slimlm.cli import main

sys.exit(main())
