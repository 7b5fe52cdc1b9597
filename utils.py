"""The public face of subnetscope's metrics, for notebooks: `from utils import gini, changed_masks`."""
from subnetscope.changes import RULES, ChangeRules, changed_masks, diff_stats
from subnetscope.checkpoint import find_step_checkpoints, open_checkpoint
from subnetscope.engine import analyze_overlap, analyze_pair, analyze_series
from subnetscope.gradrank import gradient_spectra, spectrum_from_gram
from subnetscope.metrics import (block_localization, gini, localization, normalized_entropy, overlap,
                                 effective_rank, shell_density, shell_edges, topk_share, update_rank)
from subnetscope.naming import block_index, module_type

__all__ = [
    "RULES", "ChangeRules", "changed_masks", "diff_stats", "open_checkpoint", "find_step_checkpoints",
    "analyze_pair", "analyze_series", "analyze_overlap", "gini", "normalized_entropy", "topk_share",
    "localization", "block_localization", "update_rank", "effective_rank", "overlap", "shell_edges", "shell_density",
    "block_index", "module_type", "gradient_spectra", "spectrum_from_gram",
]
