#!/usr/bin/env python
"""Fine-tune within a mask: the pruned model itself, or sparse LoRA on PEFT. See --help."""
import sys

from subnetscope.cli.sparse_ft import main

if __name__ == "__main__":
    sys.exit(main())
