#!/usr/bin/env python
"""The sparse fine-tuning experiment over a grid: masks, fine-tuning, analysis; resumable. See --help."""
import sys

from subnetscope.cli.sparse_sweep import main

if __name__ == "__main__":
    sys.exit(main())
