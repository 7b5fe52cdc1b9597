"""--view_dtype: two float32 checkpoints judged as their bf16 roundings. Deltas are planted below and
above bf16 rounding boundaries (and exactly on them, where round-to-nearest-even decides); the
counts must equal an independent numpy RNE rounding and rule count, and the float32 counts without it."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from subnetscope.changes import RULES, ChangeRules
from subnetscope.checkpoint import open_checkpoint
from subnetscope.cli import analyze, localize
from subnetscope.engine import analyze_overlap, analyze_pair, analyze_series
from subnetscope.errors import SubnetscopeError
from subnetscope.segments import compare_segments

from .conftest import DEVICES, save_state

MATRIX = "transformer.h.0.mlp.c_fc.weight"
BIAS = "transformer.h.1.attn.c_attn.bias"
RULES_USED = ChangeRules()
GROUPS = ("small", "big", "tie_even", "tie_odd", "cross", "same_side")
# per group: changed at fp32 (exact), changed at bf16 (exact), by construction
EXPECTED = {"small": (1, 0), "big": (1, 1), "tie_even": (1, 0), "tie_odd": (1, 1), "cross": (1, 1),
            "same_side": (1, 0)}


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """float32 → bf16 (kept as float32) by integer round-to-nearest-even on the bits, no torch."""
    assert x.dtype == np.float32 and np.isfinite(x).all()
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def numpy_counts(a: np.ndarray, b: np.ndarray, rules: ChangeRules) -> dict[str, int]:
    """The three rules of changes.py on finite float32 arrays, in float32 like the engine."""
    exact = a.view(np.uint32) != b.view(np.uint32)
    absd = np.abs(b - a)
    atol = exact & (absd > np.float32(rules.atol))
    eta = np.float32(rules.eta)
    relative = exact & ~((absd <= eta * np.abs(a)) | (absd <= eta * np.abs(b)))
    return {"exact": int(exact.sum()), "atol": int(atol.sum()), "relative": int(relative.sum())}


def _ulp(v: np.ndarray) -> np.ndarray:
    """One bf16 step at each (bf16-representable, nonzero) v."""
    return (2.0 ** (np.floor(np.log2(np.abs(v))) - 7)).astype(np.float32)


def _plant(base: np.ndarray, gen: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """base (bf16-representable float32) and tuned, with groups of entries planted on either side of
    bf16 rounding boundaries; returns the new base, tuned and each group's flat indices."""
    a, b = base.reshape(-1).copy(), base.reshape(-1).copy()
    idx = gen.permutation(a.size)
    groups = {g: idx[i * 7:(i + 1) * 7] for i, g in enumerate(GROUPS)}
    mant_lsb = (a.view(np.uint32) >> 16) & 1
    # the tie groups need an even / odd last bf16 mantissa bit in their base value
    evens, odds = [i for i in idx[42:] if mant_lsb[i] == 0], [i for i in idx[42:] if mant_lsb[i] == 1]
    groups["tie_even"], groups["tie_odd"] = np.array(evens[:7]), np.array(odds[:7])
    half = _ulp(a) / 2
    g = groups
    b[g["small"]] = a[g["small"]] + np.sign(a[g["small"]]) * half[g["small"]] / 4  # rounds back to the base
    b[g["big"]] = a[g["big"]] * np.float32(1 + 2 ** -5)  # four bf16 steps
    b[g["tie_even"]] = a[g["tie_even"]] + np.sign(a[g["tie_even"]]) * half[g["tie_even"]]  # RNE: stays
    b[g["tie_odd"]] = a[g["tie_odd"]] + np.sign(a[g["tie_odd"]]) * half[g["tie_odd"]]  # RNE: to the even neighbour
    tiny = half[g["cross"]] / 64
    sign = np.sign(a[g["cross"]])
    a_cross = a[g["cross"]] + sign * (half[g["cross"]] - tiny)  # just below the boundary: rounds down
    b[g["cross"]] = a[g["cross"]] + sign * (half[g["cross"]] + tiny)  # just above: rounds up
    a[g["cross"]] = a_cross
    ss = g["same_side"]
    a_ss = a[ss] + np.sign(a[ss]) * half[ss] / 5
    b[ss] = a[ss] + np.sign(a[ss]) * half[ss] * 4 / 5  # both round to the same bf16 value
    a[ss] = a_ss
    return a.reshape(base.shape), b.reshape(base.shape), groups


@pytest.fixture
def fp32_pair(tmp_path):
    """Two float32 checkpoints: a matrix with the planted groups, a bias with one group."""
    gen = np.random.default_rng(5)
    raw = {MATRIX: gen.standard_normal((16, 24)).astype(np.float32) * 0.3,
           BIAS: gen.standard_normal(72).astype(np.float32) * 0.02}
    base, tuned, groups = {}, {}, {}
    for name, values in raw.items():
        representable = torch.from_numpy(values).bfloat16().float().numpy()
        base[name], tuned[name], groups[name] = _plant(representable, gen)
    save_state(tmp_path / "base", {k: torch.from_numpy(v) for k, v in base.items()})
    save_state(tmp_path / "tuned", {k: torch.from_numpy(v) for k, v in tuned.items()})
    return tmp_path / "base", tmp_path / "tuned", base, tuned, groups


def want(base, tuned, view: bool) -> dict[str, dict[str, int]]:
    r = bf16_rne if view else (lambda x: x)
    return {n: numpy_counts(r(base[n]), r(tuned[n]), RULES_USED) for n in base}


def test_planted_groups_straddle_the_boundaries(fp32_pair):
    """The reference rounding agrees with torch's, and the planted groups land as designed."""
    _, _, base, tuned, groups = fp32_pair
    for name in base:
        a, b = base[name].reshape(-1), tuned[name].reshape(-1)
        assert np.array_equal(bf16_rne(a), torch.from_numpy(a).bfloat16().float().numpy())
        for group, (in_fp32, in_bf16) in EXPECTED.items():
            i = groups[name][group]
            assert len(i) == 7
            assert (a[i] != b[i]).all() == bool(in_fp32)
            changed = bf16_rne(a[i]) != bf16_rne(b[i])
            assert changed.all() if in_bf16 else not changed.any(), (name, group)


def test_pair_counts_at_bf16_view_equal_numpy_rne(fp32_pair):
    base_dir, tuned_dir, base, tuned, _ = fp32_pair
    at_view = analyze_pair(open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir)), RULES_USED,
                           progress=False, view_dtype="bfloat16")
    own = analyze_pair(open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir)), RULES_USED, progress=False)
    for name, counts in want(base, tuned, view=True).items():
        t = next(t for t in at_view.tensors if t.name == name)
        assert t.changed == counts and t.dtype == "bfloat16"
        assert counts["exact"] == 7 * sum(v[1] for v in EXPECTED.values())  # big, tie_odd, cross
    for name, counts in want(base, tuned, view=False).items():
        t = next(t for t in own.tensors if t.name == name)
        assert t.changed == counts and t.dtype == "float32"
        assert counts["exact"] == 7 * len(GROUPS)
    assert at_view.view_dtype == "bfloat16" and own.view_dtype is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target_bytes", [64, 1 << 30])
def test_batched_pass_rounds_each_segment_to_the_view(fp32_pair, device, target_bytes):
    """The GPU's batched pass (run here on the CPU too), segments cut into pieces or whole."""
    base_dir, tuned_dir, base, tuned, _ = fp32_pair
    got = {name: stats.changed for name, stats, _ in compare_segments(
        open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir)), list(base), RULES_USED, device,
        target_bytes=target_bytes, view=torch.bfloat16)}
    assert got == want(base, tuned, view=True)
    plain = {name: stats.changed for name, stats, _ in compare_segments(
        open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir)), list(base), RULES_USED, device,
        target_bytes=target_bytes)}
    assert plain == want(base, tuned, view=False)


def test_series_and_overlap_at_the_view(fp32_pair, tmp_path):
    base_dir, tuned_dir, base, tuned, _ = fp32_pair
    src = open_checkpoint(str(base_dir))
    series = analyze_series(src, [(1, open_checkpoint(str(base_dir))), (2, open_checkpoint(str(tuned_dir)))],
                            RULES_USED, progress=False, view_dtype="bfloat16")
    numel = sum(v.size for v in base.values())
    counts = want(base, tuned, view=True)
    for rule in RULES:
        assert series.density[rule] == [0.0, pytest.approx(sum(c[rule] for c in counts.values()) / numel)]
    result = analyze_overlap(src, open_checkpoint(str(tuned_dir)), open_checkpoint(str(tuned_dir)), RULES_USED,
                             progress=False, view_dtype="bfloat16")
    for rule in RULES:
        total = sum(c[rule] for c in counts.values())
        assert result.global_[rule]["density_1"] == pytest.approx(total / numel)
        assert result.global_[rule]["jaccard"] == (1.0 if total else None)


def read_rows(path):
    with open(path) as fh:
        return {r["name"]: r for r in csv.DictReader(fh)}


def test_analyze_cli_view_flag_and_summary(fp32_pair, tmp_path):
    base_dir, tuned_dir, base, tuned, _ = fp32_pair
    for view, out in (("bfloat16", tmp_path / "bf16"), (None, tmp_path / "own")):
        flag = ["--view_dtype", view] if view else []
        analyze.main(["--base", str(base_dir), "--tuned", str(tuned_dir), "--output_dir", str(out), "--no_tqdm",
                      "--device", "cpu", *flag])
        rows = read_rows(out / "per_tensor.csv")
        for name, counts in want(base, tuned, view=view is not None).items():
            assert {r: int(rows[name][f"{r}_changed"]) for r in RULES} == counts
        assert json.loads((out / "summary.json").read_text())["view_dtype"] == view


def test_localize_cli_judges_at_the_view(fp32_pair, tmp_path):
    base_dir, tuned_dir, base, tuned, _ = fp32_pair
    runs = []
    for label in ("r1", "r2"):
        run = tmp_path / label
        save_state(run / "base", {k: torch.from_numpy(v) for k, v in base.items()})
        save_state(run / "step_1", {k: torch.from_numpy(v) for k, v in tuned.items()})
        runs.append(str(run))
    out = tmp_path / "loc"
    localize.main(["--ckpt_dirs", *runs, "--output_dir", str(out), "--no_tqdm", "--device", "cpu", "--n_boot", "5",
                   "--rule", "exact", "--view_dtype", "bfloat16"])
    summary = json.loads((out / "summary.json").read_text())
    numel = sum(v.size for v in base.values())
    expected = sum(c["exact"] for c in want(base, tuned, view=True).values()) / numel
    assert summary["view_dtype"] == "bfloat16"
    assert [m["fraction_changed"] for m in summary["models"]] == [pytest.approx(expected)] * 2


@pytest.mark.parametrize("cli", ["analyze", "localize"])
def test_a_bad_view_dtype_is_one_line_before_any_work(fp32_pair, tmp_path, capsys, monkeypatch, cli):
    base_dir, tuned_dir, *_ = fp32_pair
    module = analyze if cli == "analyze" else localize

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --view_dtype was checked")

    monkeypatch.setattr(module, "open_checkpoint", no_work)
    out = tmp_path / "out"
    argv = (["--base", str(base_dir), "--tuned", str(tuned_dir)] if cli == "analyze"
            else ["--ckpt_dirs", str(base_dir), str(tuned_dir), "--bases", "a", "b"])
    with pytest.raises(SystemExit) as exc:
        module.main([*argv, "--output_dir", str(out), "--device", "cpu", "--view_dtype", "bf16"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: --view_dtype 'bf16'") and "bfloat16" in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_engine_refuses_an_unknown_view():
    with pytest.raises(SubnetscopeError, match="--view_dtype 'int8'"):
        analyze_pair(None, None, view_dtype="int8")
