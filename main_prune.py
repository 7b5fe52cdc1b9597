#!/usr/bin/env python
"""Train GPT-2 with gradual magnitude pruning and measure weight revival. See --help."""
import sys

from subnetscope.cli.prune import main

if __name__ == "__main__":
    sys.exit(main())
