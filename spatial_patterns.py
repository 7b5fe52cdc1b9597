#!/usr/bin/env python
"""Experiment 1B: change frequencies, hot weights, heads and next-step predictability of a run. See --help."""
import sys

from subnetscope.cli.patterns import main

if __name__ == "__main__":
    sys.exit(main())
