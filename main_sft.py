#!/usr/bin/env python
"""SFT and DPO baselines through TRL, with the update tracker attached. See --help."""
import sys

from subnetscope.cli.sft import main

if __name__ == "__main__":
    sys.exit(main())
