#!/usr/bin/env python
"""Sparsity of a saved model's linear weights. See --help."""
import sys

from subnetscope.cli.weight_sparsity import main

if __name__ == "__main__":
    sys.exit(main())
