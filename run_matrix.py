#!/usr/bin/env python
"""A resumable sweep of fine-tuning runs from a matrix file. See --help."""
import sys

from subnetscope.cli.matrix import main

if __name__ == "__main__":
    sys.exit(main())
