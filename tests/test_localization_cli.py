"""localization_analysis.py: its statistics against the per-block numbers it reports."""
import csv
import json

import pytest
import torch

from subnetscope.cli.localize import main
from subnetscope.metrics import gini, normalized_entropy, topk_share
from subnetscope.models import tiny_model

from .conftest import save_state


def make_run(root, arch, layers, changed_layers, seed):
    model = tiny_model(arch, vocab_size=64, **({"n_layer": layers} if arch == "gpt2" else {"num_layers": layers}))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_state(root / "base", state)
    gen = torch.Generator().manual_seed(seed)
    for step in (10, 20):
        for name, value in state.items():
            layer = name.split(".")[2] if name.startswith(("transformer.h.", "model.layers.")) else None
            rate = 0.3 if layer is not None and int(layer) in changed_layers else 0.01
            mask = torch.rand(value.shape, generator=gen) < rate
            value[mask] += 0.1
        save_state(root / f"step_{step}", state)
    return root


def test_concentrated_model_is_detected(tmp_path):
    a = make_run(tmp_path / "gpt2", "gpt2", 6, {2}, seed=0)
    b = make_run(tmp_path / "gemma", "gemma3n", 6, set(range(6)), seed=1)
    out = tmp_path / "cmp"
    main(["--ckpt_dirs", str(a), str(b), "--labels", "gpt2", "gemma3n", "--output_dir", str(out),
          "--no_tqdm", "--device", "cpu", "--n_boot", "400", "--rule", "exact"])
    with open(out / "localization_stats.csv") as fh:
        stats = {r["model"]: r for r in csv.DictReader(fh)}
    with open(out / "block_profiles.csv") as fh:
        profiles = {}
        for r in csv.DictReader(fh):
            profiles.setdefault(r["model"], []).append(float(r["fraction_changed"]))
    for model in ("gpt2", "gemma3n"):
        prof = profiles[model]
        assert len(prof) == 6
        assert float(stats[model]["gini"]) == pytest.approx(gini(prof))
        assert float(stats[model]["entropy"]) == pytest.approx(normalized_entropy(prof))
        assert float(stats[model]["top3"]) == pytest.approx(topk_share(prof, 3))
        assert float(stats[model]["gini_ci_low"]) <= float(stats[model]["gini"]) <= float(stats[model]["gini_ci_high"])
    summary = json.loads((out / "summary.json").read_text())
    tests = {t["hypothesis"]: t for t in summary["tests"]}
    assert tests["gpt2 more concentrated than gemma3n"]["p_value"] < 0.05
    assert tests["gemma3n more concentrated than gpt2"]["p_value"] > 0.5
    for png in ("block_profiles.png", "gini.png", "density_curves.png"):
        assert (out / png).exists()
    assert (out / "gemma3n" / "shells.csv").exists()


def test_mismatched_lists_are_an_input_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--ckpt_dirs", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "only-one"])
    assert exc.value.code == 2
    assert "--labels has 1 entries for 2" in capsys.readouterr().err
