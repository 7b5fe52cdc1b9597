"""localization_analysis.py: its statistics against the per-block numbers it reports."""
import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from subnetscope import plots
from subnetscope.cli.localize import distinct_suffixes, main
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
    # only the MatFormer has nested shells; GPT-2's first "shell" would be an arbitrary half of its neurons
    assert stats["gpt2"]["shell0_ratio_to_uniform"] == "" and float(stats["gemma3n"]["shell0_ratio_to_uniform"]) > 0


def test_mismatched_lists_are_an_input_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--ckpt_dirs", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "only-one"])
    assert exc.value.code == 2
    assert "--labels has 1 entries for 2" in capsys.readouterr().err


def changed_entries(run) -> int:
    """Entries of the last checkpoint that differ from θ0, counted from the saved files."""
    base = load_file(str(run / "base" / "model.safetensors"))
    last = load_file(str(run / "step_20" / "model.safetensors"))
    return sum(int((base[k] != last[k]).sum()) for k in base)


def test_runs_with_one_folder_name_get_their_own_tables(tmp_path):
    a = make_run(tmp_path / "a" / "run", "gpt2", 3, {1}, seed=0)
    b = make_run(tmp_path / "b" / "run", "gpt2", 3, {0, 2}, seed=1)
    out = tmp_path / "cmp"
    main(["--ckpt_dirs", str(a), str(b), "--output_dir", str(out), "--no_tqdm", "--device", "cpu", "--n_boot", "50",
          "--rule", "exact"])
    for run, folder in ((a, "a_run"), (b, "b_run")):
        with open(out / folder / "per_tensor.csv") as fh:
            assert sum(int(r["exact_changed"]) for r in csv.DictReader(fh)) == changed_entries(run)
    assert changed_entries(a) != changed_entries(b)
    with open(out / "localization_stats.csv") as fh:
        rows = {r["model"]: r["folder"] for r in csv.DictReader(fh)}
    assert rows == {"a/run": "a_run", "b/run": "b_run"}
    assert not (out / "run").exists()


def test_labels_are_the_shortest_distinguishing_suffixes(tmp_path):
    dirs = [tmp_path / "x" / "a" / "run", tmp_path / "y" / "a" / "run", tmp_path / "b" / "run", tmp_path / "other"]
    assert distinct_suffixes([str(d) for d in dirs]) == ["x/a/run", "y/a/run", "b/run", "other"]


@pytest.mark.parametrize("argv, message", [
    (["--ckpt_dirs", "r1", "r1"], "--ckpt_dirs lists r1 twice"),
    (["--ckpt_dirs", "r1", "r2", "--labels", "m", "m"], "--labels names 'm' twice"),
    (["--ckpt_dirs", "r1", "r2", "--labels", "a/b", "a_b"], "would share the folder a_b"),
])
def test_runs_that_would_share_a_folder_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--bases", "m1", "m2", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_density_curves_have_a_title_and_whole_steps():
    fig = plots.comparative_series_figure(["a", "b"], [[1, 2], [1, 2, 3]], [[0.1, 0.2], [0.1, 0.2, 0.3]],
                                          "fraction changed", "how the changed fraction grows")
    ax = fig.axes[0]
    assert ax.get_title() == "how the changed fraction grows"
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks == [1, 2, 3]
