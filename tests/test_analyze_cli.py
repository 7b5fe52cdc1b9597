"""analyze_sparse_subnetwork.py end to end: planted deltas must come back as exact counts."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subnetscope import plots
from subnetscope.changes import ChangeRules
from subnetscope.checkpoint import (
    COMPACT_FILE,
    atomic_save_dir,
    open_checkpoint,
    save_compact,
)
from subnetscope.cli.analyze import main
from subnetscope.engine import analyze_pair, analyze_series
from subnetscope.models import tiny_model

from .conftest import plant, save_state

ROOT = Path(__file__).resolve().parents[1]


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def run_cli(*args):
    main([*map(str, args), "--no_tqdm", "--device", "cpu"])


def test_pair_counts_equal_planted(tiny_gpt2_pair, tmp_path):
    base, tuned, counts, state = tiny_gpt2_pair
    out = tmp_path / "out"
    run_cli("--base", base, "--tuned", tuned, "--output_dir", out)
    rows = {r["name"]: r for r in read_csv(out / "per_tensor.csv")}
    assert set(rows) == set(state)
    for name, row in rows.items():
        for rule in ("exact", "atol", "relative"):
            assert int(row[f"{rule}_changed"]) == counts.get(name, 0)
    blocks = {r["block"]: r for r in read_csv(out / "per_block.csv")}
    assert int(blocks["1"]["exact"]) == 137 and int(blocks["2"]["exact"]) == 5
    assert int(blocks["0"]["exact"]) == 0 and int(blocks["outside"]["exact"]) == 11
    summary = json.loads((out / "summary.json").read_text())
    total = sum(v.numel() for v in state.values())
    assert summary["pair"]["numel"] == total
    assert summary["pair"]["fraction_changed"]["exact"] == pytest.approx(153 / total)
    modules = {r["module"]: r for r in read_csv(out / "per_module.csv")}
    assert int(modules["mlp.up"]["exact"]) == 100 and int(modules["attn.qkv"]["exact"]) == 37
    for png in ("heatmap_block_module.png", "per_block.png"):
        assert (out / png).stat().st_size > 1000


def test_worker_count_does_not_change_results(tiny_gpt2_pair, tmp_path):
    base, tuned, _, _ = tiny_gpt2_pair
    for workers in (1, 3):
        run_cli("--base", base, "--tuned", tuned, "--output_dir", tmp_path / str(workers), "--workers", workers)
    assert read_csv(tmp_path / "1" / "per_tensor.csv") == read_csv(tmp_path / "3" / "per_tensor.csv")
    assert read_csv(tmp_path / "1" / "shells.csv") == read_csv(tmp_path / "3" / "shells.csv")


def test_rank_of_planted_rank_one_update(tmp_path):
    base_state = {"transformer.h.0.mlp.c_fc.weight": torch.randn(16, 24), "transformer.h.0.ln_1.weight": torch.ones(16)}
    tuned_state = dict(base_state)
    tuned_state["transformer.h.0.mlp.c_fc.weight"] = (base_state["transformer.h.0.mlp.c_fc.weight"]
                                                      + torch.outer(torch.randn(16), torch.randn(24)))
    save_state(tmp_path / "a", base_state)
    save_state(tmp_path / "b", tuned_state)
    run_cli("--base", tmp_path / "a", "--tuned", tmp_path / "b", "--output_dir", tmp_path / "out", "--rank")
    rows = {r["name"]: r for r in read_csv(tmp_path / "out" / "per_tensor.csv")}
    row = rows["transformer.h.0.mlp.c_fc.weight"]
    assert (int(row["rank"]), int(row["full_rank"])) == (1, 16)
    assert (tmp_path / "out" / "rank_histogram.png").exists()


def gemma_run(tmp_path, steps_masks):
    """A compact-checkpoint run of a tiny Gemma-3n; steps_masks: step -> {name: bool mask vs θ0}."""
    model = tiny_model("gemma3n", vocab_size=64).to(torch.bfloat16)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    run = tmp_path / "run"
    save_state(run / "base", theta0)
    for step, masks in steps_masks.items():
        tensors = {}
        for name, w0 in theta0.items():
            mask = masks.get(name, torch.zeros_like(w0, dtype=torch.bool))
            w = torch.where(mask, (w0.float() + 0.5 * (w0.float().abs() + 0.1)).to(w0.dtype), w0)
            tensors[name] = (w, mask)
        atomic_save_dir(run / f"step_{step}", lambda tmp: save_compact(tmp / COMPACT_FILE, step, "../base", tensors))
    return run, theta0


def test_series_density_coverage_consecutive_and_hot(tmp_path):
    name = "model.layers.1.mlp.gate_proj.weight"  # 64 x 32
    s1 = torch.zeros(64, 32, dtype=torch.bool)
    s1[:4] = True  # 128 weights
    s2 = s1.clone()
    s2[10:12] = True  # +64 weights
    s3 = torch.zeros(64, 32, dtype=torch.bool)
    s3[10:12] = True  # first set reverted to θ0
    run, theta0 = gemma_run(tmp_path, {10: {name: s1}, 20: {name: s2}, 30: {name: s3}})
    out = tmp_path / "out"
    run_cli("--ckpt_dir", run, "--output_dir", out)
    numel = sum(v.numel() for v in theta0.values())
    series = {int(r["step"]): r for r in read_csv(out / "series.csv")}
    assert float(series[10]["exact_density"]) == pytest.approx(128 / numel)
    assert float(series[20]["exact_density"]) == pytest.approx(192 / numel)
    assert float(series[30]["exact_density"]) == pytest.approx(64 / numel)
    assert float(series[10]["exact_coverage"]) == pytest.approx(0.0)
    assert float(series[20]["exact_coverage"]) == pytest.approx(1.0)
    assert float(series[20]["exact_consecutive"]) == pytest.approx(64 / numel)
    assert float(series[30]["exact_consecutive"]) == pytest.approx(128 / numel)
    hot = {int(r["times_changed"]): int(r["exact"]) for r in read_csv(out / "hot_histogram.csv")}
    # s1 weights changed at step 10 and reverted at 30 (twice); s2-only weights changed once
    assert hot == {0: numel - 192, 1: 64, 2: 128, 3: 0}
    top = read_csv(out / "hot_tensors.csv")[0]
    assert top["name"] == name
    assert float(top["mean_times_changed_relative"]) == pytest.approx((64 + 2 * 128) / (64 * 32))


def test_matformer_shells_see_inner_concentration(tmp_path):
    masks = {}
    for layer in range(4):
        gate = torch.zeros(64, 32, dtype=torch.bool)
        gate[:32:2] = True  # every other inner neuron: the inner shell (first 32 of 64) only
        down = torch.zeros(32, 64, dtype=torch.bool)
        down[:, 40] = True  # one outer neuron's column
        masks[f"model.layers.{layer}.mlp.gate_proj.weight"] = gate
        masks[f"model.layers.{layer}.mlp.down_proj.weight"] = down
    run, _ = gemma_run(tmp_path, {5: masks, 10: masks})
    out = tmp_path / "out"
    run_cli("--ckpt_dir", run, "--output_dir", out)
    shells = [r for r in read_csv(out / "shells.csv") if r["rule"] == "exact"]
    # per layer: gate/up/down each 2048 weights, 1024 per shell; inner: 16·32 = 512, outer: 32
    inner, outer = shells
    assert int(inner["changed"]) == 4 * 512 and int(outer["changed"]) == 4 * 32
    assert int(inner["weights"]) == 4 * 3 * 1024
    assert float(inner["ratio_to_uniform"]) == pytest.approx((512 / 3072) / (544 / 6144))
    modules = {r["module"]: r for r in read_csv(out / "per_module.csv")}
    assert {"altup", "laurel", "per_layer_embedding"} <= set(modules)


def test_overlap_of_two_runs(tmp_path):
    w = torch.randn(100, 10)
    base = save_state(tmp_path / "base", {"transformer.h.0.attn.c_attn.weight": w})
    m1 = torch.zeros(1000, dtype=torch.bool)
    m1[:100] = True
    m2 = torch.zeros(1000, dtype=torch.bool)
    m2[50:250] = True
    r1 = save_state(tmp_path / "r1", {"transformer.h.0.attn.c_attn.weight": torch.where(m1.view(100, 10), w + 1, w)})
    r2 = save_state(tmp_path / "r2", {"transformer.h.0.attn.c_attn.weight": torch.where(m2.view(100, 10), w + 1, w)})
    out = tmp_path / "out"
    run_cli("--base", base, "--tuned", r1, "--overlap_with", r2, "--output_dir", out)
    o = json.loads((out / "summary.json").read_text())["overlap"]["exact"]
    assert o["o1"] == pytest.approx(50 / 100) and o["o2"] == pytest.approx(50 / 200)
    assert o["jaccard"] == pytest.approx(50 / 250)
    assert o["o1_random"] == pytest.approx(0.2) and o["o2_random"] == pytest.approx(0.1)
    per_tensor = read_csv(out / "overlap_per_tensor.csv")
    assert float(per_tensor[0]["exact_o1"]) == pytest.approx(0.5)


def test_resized_vocab_dtype_mismatch_nan_and_one_sided_tensors(tmp_path, capsys):
    base = {"transformer.wte.weight": torch.randn(10, 4), "transformer.h.0.ln_1.weight": torch.ones(4),
            "transformer.h.0.attn.c_proj.weight": torch.randn(4, 4), "extra.base_only": torch.zeros(2)}
    tuned = {"transformer.wte.weight": torch.cat([base["transformer.wte.weight"], torch.randn(2, 4)]),
             "transformer.h.0.ln_1.weight": torch.ones(4, dtype=torch.float16),
             "transformer.h.0.attn.c_proj.weight": base["transformer.h.0.attn.c_proj.weight"].clone()}
    tuned["transformer.wte.weight"][3, 1] += 1.0
    tuned["transformer.h.0.attn.c_proj.weight"][0, 0] = float("nan")
    save_state(tmp_path / "a", base)
    save_state(tmp_path / "b", tuned)
    out = tmp_path / "out"
    run_cli("--base", tmp_path / "a", "--tuned", tmp_path / "b", "--output_dir", out)
    err = capsys.readouterr().err
    assert "compared the common (10, 4)" in err
    assert "compared in torch.float32" in err
    assert "1 tensors only in the base" in err and "extra.base_only" in err
    assert "NaN/inf weights: 0 in the base, 1 in the tuned model" in err
    rows = {r["name"]: r for r in read_csv(out / "per_tensor.csv")}
    assert int(rows["transformer.wte.weight"]["exact_changed"]) == 1
    assert int(rows["transformer.wte.weight"]["numel"]) == 40
    assert int(rows["transformer.h.0.ln_1.weight"]["exact_changed"]) == 0
    assert int(rows["transformer.h.0.attn.c_proj.weight"]["nonfinite_tuned"]) == 1
    summary = json.loads((out / "summary.json").read_text())["pair"]
    assert summary["only_in_base"] == ["extra.base_only"] and summary["nonfinite"]["tuned"] == 1


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "analyze_sparse_subnetwork.py"), *map(str, args), "--no_tqdm"],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "single", "nothing", "workers"])
def test_bad_input_exits_2_with_one_line(tmp_path, case):
    if case == "missing":
        result = run_script("--base", tmp_path / "nope", "--tuned", tmp_path / "nope2")
    elif case == "single":
        save_state(tmp_path / "run" / "base", {"w": torch.zeros(3)})
        save_state(tmp_path / "run" / "step_10", {"w": torch.ones(3)})
        result = run_script("--ckpt_dir", tmp_path / "run", "--output_dir", tmp_path / "o")
    elif case == "workers":
        save_state(tmp_path / "a", {"w": torch.zeros(3)})
        result = run_script("--base", tmp_path / "a", "--tuned", tmp_path / "a", "--workers", "0")
    else:
        result = run_script()
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_help_explains_every_flag():
    result = run_script("--help")
    assert result.returncode == 0
    for flag in ("--ckpt_dir", "--max_step", "--step_interval", "--base", "--tuned", "--atol", "--eta",
                 "--device", "--rank", "--workers", "--output_dir", "--overlap_with", "--shells", "--rule", "--topk",
                 "--view_dtype"):
        assert flag in result.stdout


def test_shells_figure_only_for_a_matformer(tiny_gpt2_pair, tmp_path, capsys):
    """GPT-2 has no nested FFNs: no MatFormer figure (one line says why); Gemma-3n gets it."""
    base, tuned, _, _ = tiny_gpt2_pair
    run_cli("--base", base, "--tuned", tuned, "--output_dir", tmp_path / "gpt2")
    said = [line for line in capsys.readouterr().out.splitlines() if "shells.png" in line]
    assert not (tmp_path / "gpt2" / "shells.png").exists()
    assert len(said) == 1 and "not a MatFormer" in said[0]
    model = tiny_model("gemma3n", vocab_size=64)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_state(tmp_path / "g0", state)
    save_state(tmp_path / "g1", plant(state, {"model.layers.0.mlp.gate_proj.weight": 50}))
    run_cli("--base", tmp_path / "g0", "--tuned", tmp_path / "g1", "--output_dir", tmp_path / "gemma")
    assert (tmp_path / "gemma" / "shells.png").stat().st_size > 1000
    assert "no shells.png" not in capsys.readouterr().out


def test_per_block_legend_covers_no_bar(tmp_path):
    """Every block fully changed: bars reach the top, so a legend inside the axes would cover some."""
    model = tiny_model("gpt2", vocab_size=64, n_layer=3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lm_head" not in k}
    save_state(tmp_path / "a", state)
    save_state(tmp_path / "b", {k: v + 1.0 for k, v in state.items()})
    pair = analyze_pair(open_checkpoint(str(tmp_path / "a")), open_checkpoint(str(tmp_path / "b")), ChangeRules(),
                        progress=False)
    fig = plots.per_block_figure(pair)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    assert len(bars) == 3 * 3 and max(b.y1 for b in bars) > ax.get_window_extent(renderer).y1 - 20
    assert not any(legend.overlaps(bar) for bar in bars)
    assert not legend.overlaps(ax.title.get_window_extent(renderer))
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)


def visible_ticks(axis, limits) -> list[float]:
    low, high = sorted(limits)
    return [t for t in axis.get_ticklocs() if low <= t <= high]


def test_count_axes_have_whole_number_ticks(tmp_path):
    """Steps 1-3 and 0-3 checkpoints: matplotlib's default ticks would be 1.25, 2.5, ..."""
    name = "model.layers.1.mlp.gate_proj.weight"
    first = torch.zeros(64, 32, dtype=torch.bool)
    first[:4] = True
    more = first.clone()
    more[10:12] = True
    run, _ = gemma_run(tmp_path, {1: {name: first}, 2: {name: more}, 3: {name: first}})
    opened = [(s, open_checkpoint(str(run / f"step_{s}"))) for s in (1, 2, 3)]
    series = analyze_series(open_checkpoint(str(run / "base")), opened, ChangeRules(), progress=False)
    hot = plots.hot_histogram_figure(series, "exact")
    curves = plots.density_coverage_figure(series)
    for ax in [*hot.axes, *curves.axes]:
        ticks = visible_ticks(ax.xaxis, ax.get_xlim())
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    assert visible_ticks(hot.axes[0].xaxis, hot.axes[0].get_xlim()) == [0, 1, 2, 3]
