#!/usr/bin/env python
"""Tables and figures from a folder of pruning runs. See --help."""
import sys

from subnetscope.cli.prune_report import main

if __name__ == "__main__":
    sys.exit(main())
