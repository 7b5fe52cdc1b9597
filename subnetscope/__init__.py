"""subnetscope: which weights did fine-tuning actually change, and where do they sit?"""

__version__ = "0.1.0"
