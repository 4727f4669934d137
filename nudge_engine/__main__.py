"""`python -m nudge_engine ...` = the `nudge` command."""
import sys

from .cli import main

sys.exit(main())
