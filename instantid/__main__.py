"""`python -m instantid`: the command line (instantid/frontends/cli.py)."""

import sys

from .frontends.cli import _quiet_libraries, main

if __name__ == "__main__":
    _quiet_libraries()  # the program's, not main()'s: a test calling main() in its own process keeps its settings
    sys.exit(main())
