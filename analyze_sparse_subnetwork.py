#!/usr/bin/env python
"""Which weights did fine-tuning change, and where are they? See --help."""
import sys

from subnetscope.cli.analyze import main

if __name__ == "__main__":
    sys.exit(main())
