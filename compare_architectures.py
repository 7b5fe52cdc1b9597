#!/usr/bin/env python
"""One RL recipe on several models and seeds, then the localization study. See --help."""
import sys

from subnetscope.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
