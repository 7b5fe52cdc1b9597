#!/usr/bin/env python
"""H2 (sparsity vs reward) and H3 (advantage sharpness vs sparsity) over existing runs. See --help."""
import sys

from subnetscope.cli.hypotheses import main

if __name__ == "__main__":
    sys.exit(main())
