#!/usr/bin/env python
"""The RL-sparsity study on real pretrained models. See --help."""
import sys

from subnetscope.cli.real_study import main

if __name__ == "__main__":
    sys.exit(main())
