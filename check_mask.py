#!/usr/bin/env python
"""Check that a merged checkpoint is exactly zero wherever its mask is. See --help."""
import sys

from subnetscope.cli.check_mask import main

if __name__ == "__main__":
    sys.exit(main())
