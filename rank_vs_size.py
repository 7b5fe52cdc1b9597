#!/usr/bin/env python
"""Experiment 1C: update rank under three definitions against model size, several runs in one call. See --help."""
import sys

from subnetscope.cli.rank_size import main

if __name__ == "__main__":
    sys.exit(main())
