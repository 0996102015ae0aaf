"""``python -m leanvit`` runs the command line."""
import sys

from leanvit.cli import main

sys.exit(main())
