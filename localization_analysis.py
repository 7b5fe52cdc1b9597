#!/usr/bin/env python
"""Compare how localized several runs' updates are, with bootstrap intervals and a test. See --help."""
import sys

from subnetscope.cli.localize import main

if __name__ == "__main__":
    sys.exit(main())
