#!/usr/bin/env python
"""Effective rank of per-batch policy gradients, RL against SFT. See --help."""
import sys

from subnetscope.cli.gradrank import main

if __name__ == "__main__":
    sys.exit(main())
