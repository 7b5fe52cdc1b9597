#!/usr/bin/env python
"""Build the pretrained testbed, or run the RL-sparsity study on it. See --help."""
import sys

from subnetscope.cli.testbed import main

if __name__ == "__main__":
    sys.exit(main())
