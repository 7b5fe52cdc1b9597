"""spatial_patterns.py (experiment 1B) against an independent numpy recount of a planted run."""
import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from subnetscope.checkpoint import (
    COMPACT_FILE,
    TRAINER_STATE,
    atomic_save_dir,
    save_compact,
)
from subnetscope.cli.patterns import main

from .conftest import save_state

ATTN = "transformer.h.0.attn.c_attn.weight"  # GPT-2 Conv1D [8, 24]: q | k | v columns, two heads of 4 each
MLP = "transformer.h.1.mlp.c_fc.weight"
NORM = "transformer.ln_f.weight"
SHAPES = {ATTN: (8, 24), MLP: (8, 16), NORM: (8,)}
STEPS = (2, 4, 6, 8, 10)


def head_of_column(j: int) -> int:
    return (j % 8) // 4


def planted_run(root, with_state=True):
    """θ0 and five checkpoints; each step changes a random subset (head 1 of the attention matrix four times as
    often as head 0, row 0 of the MLP matrix every step). Returns every state and each checkpoint's scores."""
    gen = torch.Generator().manual_seed(0)
    theta0 = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    save_state(root / "base", theta0)
    (root / "base" / "config.json").write_text(json.dumps({"n_embd": 8, "n_head": 2, "model_type": "gpt2"}))
    (root / "run_config.json").write_text(json.dumps({"parameters": {n: list(s) for n, s in SHAPES.items()}}))
    states, scores = [theta0], []
    for step in STEPS:
        state = {}
        for name, w in states[-1].items():
            rate = torch.full(w.shape, 0.3)
            if name == ATTN:
                rate[:, [j for j in range(24) if head_of_column(j) == 1]] = 0.6
                rate[:, [j for j in range(24) if head_of_column(j) == 0]] = 0.15
            hit = torch.rand(w.shape, generator=gen) < rate
            if name == MLP:
                hit[0] = True
            state[name] = torch.where(hit, w + torch.randn(w.shape, generator=gen), w)
        states.append(state)
        score = {n: torch.rand(s, generator=gen) for n, s in SHAPES.items()}  # distinct values: no ties
        scores.append(score)

        def write(tmp, state=state, score=score, step=step):
            save_compact(tmp / COMPACT_FILE, step, "../base", {n: (w, w != theta0[n]) for n, w in state.items()})
            if with_state:
                optimizer = {"state": {i: {"step": torch.tensor(float(step)), "exp_avg_sq": score[n]}
                                       for i, n in enumerate(SHAPES)},
                             "param_groups": [{"params": list(range(len(SHAPES))), "lr": 1e-3}]}
                torch.save({"step": step, "optimizer": optimizer, "rng": {}, "extra": {}}, tmp / TRAINER_STATE)

        atomic_save_dir(root / f"step_{step}", write)
    return states, scores


def expected(states, scores):
    """Counts, histogram, head shares and prediction tallies recomputed with numpy sets."""
    T = len(states) - 1
    changed = [{n: states[t][n].numpy() != states[t - 1][n].numpy() for n in SHAPES} for t in range(1, T + 1)]
    counts = {n: sum(c[n].astype(int) for c in changed) for n in SHAPES}
    tallies = {}
    for t in range(2, T + 1):  # predict transition t (1-based) from what checkpoint t-1 knew
        past = {n: sum(changed[s][n].astype(int) for s in range(t - 1)) for n in SHAPES}
        for n in SHAPES:
            last = changed[t - 2][n]
            k = int(last.sum())
            flat = scores[t - 2][n].numpy().ravel()
            top = np.zeros(flat.size, dtype=bool)
            top[np.argsort(-flat)[:k]] = True
            preds = {"previous": last, "ever": past[n] > 0, "hot_so_far": 2 * past[n] > t - 1,
                     "grad_ema": top.reshape(last.shape)}
            for key, pred in preds.items():
                slot = tallies.setdefault((t, key), [0, 0, 0, 0])
                target = changed[t - 1][n]
                slot[0] += int(pred.sum())
                slot[1] += int((pred & target).sum())
                slot[2] += int(target.sum())
                slot[3] += target.size
    return counts, tallies


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def run_cli(*args):
    main([*map(str, args), "--no_tqdm", "--device", "cpu"])


def test_patterns_equal_an_independent_recount(tmp_path):
    states, scores = planted_run(tmp_path / "run")
    counts, tallies = expected(states, scores)
    T = len(STEPS)
    out = tmp_path / "out"
    run_cli("--ckpt_dir", tmp_path / "run", "--output_dir", out, "--rule", "exact")
    summary = json.loads((out / "patterns_summary.json").read_text())
    numel = sum(c.size for c in counts.values())
    hot = {n: 2 * c > T for n, c in counts.items()}
    assert summary["transitions"] == T and summary["steps"] == list(STEPS) and summary["weights"] == numel
    assert summary["hot_weights"] == sum(int(h.sum()) for h in hot.values())
    assert summary["histogram"] == np.bincount(np.concatenate([c.ravel() for c in counts.values()]),
                                               minlength=T + 1).tolist()
    assert summary["head_dim"] == 4 and summary["grad_ema_source"].startswith("Adam's EMA")
    # the full-resolution map: per tensor, the transitions each weight changed at
    saved = load_file(str(out / "change_counts.safetensors"))
    for n in SHAPES:
        assert np.array_equal(saved[n].numpy(), counts[n]), n
    matrices = {r["name"]: r for r in read_csv(out / "matrix_patterns.csv")}
    for n in SHAPES:
        assert int(matrices[n]["hot_weights"]) == int(hot[n].sum())
        assert float(matrices[n]["mean_frequency"]) == pytest.approx(counts[n].sum() / (counts[n].size * T))
    listed = {(r["name"], int(r["index"])): int(r["times_changed"]) for r in read_csv(out / "hot_weights.csv")}
    assert listed == {(n, int(i)): int(counts[n].ravel()[i]) for n in SHAPES for i in np.flatnonzero(hot[n])}
    assert all(listed[(MLP, i)] == T for i in range(16))  # row 0 of the MLP matrix changed at every step
    heads = {int(r["head"]): r for r in read_csv(out / "head_share.csv") if r["name"] == ATTN}
    by_head = [sum(counts[ATTN][:, j].sum() for j in range(24) if head_of_column(j) == h) for h in (0, 1)]
    for h in (0, 1):
        assert int(heads[h]["changes"]) == by_head[h]
        assert float(heads[h]["ratio_to_uniform"]) == pytest.approx(by_head[h] / sum(by_head) / 0.5)
    assert float(heads[1]["ratio_to_uniform"]) > 1.3  # the planted hot head
    rows = read_csv(out / "prediction.csv")
    for r in rows:
        if r["transition"] == "all":
            continue
        predicted, hits, target, weights = tallies[(int(r["transition"]), r["predictor"])]
        assert (int(r["predicted"]), int(r["hits"]), int(r["changed"]), int(r["weights"])) == (
            predicted, hits, target, weights), r
        assert float(r["precision"]) == pytest.approx(hits / predicted)
        assert float(r["chance_precision"]) == pytest.approx(target / weights)
        assert float(r["chance_recall"]) == pytest.approx(predicted / weights)
    assert {r["predictor"] for r in rows} == {"previous", "ever", "hot_so_far", "grad_ema"}
    for png in ("frequency_histogram.png", "frequency_maps.png", "head_share.png", "prediction.png"):
        assert (out / png).stat().st_size > 0


def test_patterns_without_optimizer_state_say_so(tmp_path, capsys):
    planted_run(tmp_path / "run", with_state=False)
    out = tmp_path / "out"
    run_cli("--ckpt_dir", tmp_path / "run", "--output_dir", out, "--no_map", "--maps", "0")
    summary = json.loads((out / "patterns_summary.json").read_text())
    assert "grad_ema" not in summary["prediction"] and summary["grad_ema_source"] is None
    assert any("grad_ema not predicted" in n for n in summary["notes"])
    assert not (out / "change_counts.safetensors").exists() and not (out / "frequency_maps.png").exists()
    assert "grad_ema not predicted" in capsys.readouterr().out


@pytest.mark.parametrize("flags,needle", [(["--max_hot", "0"], "--max_hot"), (["--head_dim", "0"], "--head_dim"),
                                          (["--atol", "nan"], "--atol"), (["--max_step", "2"], "two step checkpoints")])
def test_patterns_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, flags, needle):
    planted_run(tmp_path / "run", with_state=False)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        run_cli("--ckpt_dir", tmp_path / "run", "--output_dir", out, *flags)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_patterns_refuse_an_output_folder_that_is_a_file(tmp_path, capsys):
    planted_run(tmp_path / "run", with_state=False)
    blocker = tmp_path / "out"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        run_cli("--ckpt_dir", tmp_path / "run", "--output_dir", blocker)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--output_dir" in err[0] and blocker.read_text() == ""
