"""The engine's batched pass (segments.py, used on GPUs) against the tensor-by-tensor statistics of
changes.diff_stats, run here on the CPU: same counts, same per-neuron tables, same sums."""
from __future__ import annotations

import math

import pytest
import torch

from subnetscope.changes import RULES, ChangeRules, diff_stats, reference_stats
from subnetscope.checkpoint import open_checkpoint
from subnetscope.errors import SubnetscopeError
from subnetscope.metrics import update_rank
from subnetscope.naming import neuron_axis
from subnetscope.segments import batchable, compare_segments, plan_segments

from .conftest import DEVICES, plant, save_state
from .test_changes import (
    EDGE_RULES,
    REPRO_BASE,
    REPRO_TUNED,
    add_rule,
    assert_stats_equal,
    edge_pair,
    loose,
    numpy_rules,
    planted_pair,
)


def _odd_pair(tmp_path):
    """bf16 and fp32 tensors with NaN and inf on either side, one unchanged, one fully changed."""
    gen = torch.Generator().manual_seed(3)
    base = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(24, 10, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(10, 24, generator=gen).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(10, generator=gen),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(16, 10, generator=gen).to(torch.bfloat16),
        "model.layers.1.post_attention_layernorm.weight": torch.randn(10, generator=gen),
        "model.norm.weight": torch.randn(10, generator=gen).to(torch.bfloat16),
    }
    tuned = plant(base, {"model.layers.0.mlp.up_proj.weight": 31, "model.layers.0.mlp.down_proj.weight": 7,
                         "model.layers.0.input_layernorm.weight": 3})
    base["model.layers.1.self_attn.q_proj.weight"][2, 3] = float("inf")
    tuned["model.layers.1.self_attn.q_proj.weight"] = base["model.layers.1.self_attn.q_proj.weight"].clone()
    tuned["model.layers.1.self_attn.q_proj.weight"][0, :4] = float("nan")
    tuned["model.layers.1.post_attention_layernorm.weight"] = (
        base["model.layers.1.post_attention_layernorm.weight"] * 1.5)
    tuned["model.norm.weight"] = base["model.norm.weight"].clone()
    return save_state(tmp_path / "odd_base", base), save_state(tmp_path / "odd_tuned", tuned)


def _assert_same(batched, ref, name):
    assert batched.changed == ref.changed, name
    assert (batched.nonfinite_base, batched.nonfinite_tuned, batched.finite_count) == \
           (ref.nonfinite_base, ref.nonfinite_tuned, ref.finite_count), name
    for field in ("abs_max", "abs_sum", "abs_sq_sum", "base_sq_sum"):
        assert getattr(batched, field) == pytest.approx(getattr(ref, field), rel=1e-9, abs=1e-15), (name, field)
    for along in ("row_changed", "col_changed"):
        got, want = getattr(batched, along), getattr(ref, along)
        assert (got is None) == (want is None), (name, along)
        if want is not None:
            for rule in RULES:
                assert torch.equal(got[rule], want[rule]), (name, along, rule)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target_bytes", [1, 700, 1 << 30])
def test_batched_pass_equals_tensor_by_tensor(tiny_gpt2_pair, tmp_path, target_bytes, device):
    """Every tensor cut into one-row pieces, several tensors or pieces per segment, one segment per
    dtype: every statistic equals diff_stats', ranks equal update_rank's for whole matrices."""
    rules = ChangeRules(atol=1e-2, eta=1e-3)
    any_split = False
    for base_dir, tuned_dir in [tiny_gpt2_pair[:2], _odd_pair(tmp_path)]:
        base, tuned = open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir))
        names = [n for n in base.names() if n in tuned.names()]
        assert all(batchable(base, tuned, n) for n in names)
        split = {m.name for s in plan_segments(base, tuned, names, target_bytes) for m in s.members if m.pieces > 1}
        any_split |= bool(split)
        seen = []
        for name, stats, ranks in compare_segments(base, tuned, names, rules, device, rank=True,
                                                   target_bytes=target_bytes):
            a, b = base.get(name), tuned.get(name)
            axis = neuron_axis(name, tuple(a.shape))
            _assert_same(stats, diff_stats(a, b, rules, per_row_col=axis is not None), name)
            whole_matrix = a.dim() == 2 and name not in split
            assert ranks == (update_rank(b.float() - a.float(), device) if whole_matrix else None)
            seen.append(name)
        assert sorted(seen) == sorted(names)
    assert any_split == (target_bytes < 1 << 30)


def test_large_tensors_are_cut_into_whole_rows(tiny_gpt2_pair):
    base_dir, tuned_dir, _, state = tiny_gpt2_pair
    base, tuned = open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir))
    segments = plan_segments(base, tuned, base.names(), target_bytes=1000)
    pieces = [m for s in segments for m in s.members if m.name == "transformer.wte.weight"]
    rows, cols = state["transformer.wte.weight"].shape
    assert len(pieces) == pieces[0].pieces > 1 and sum(m.shape[0] for m in pieces) == rows
    assert all(m.shape[1:] == (cols,) and m.numel * 2 <= 1000 for m in pieces)
    assert all(s.nbytes <= 1000 for s in segments)
    spans = [m.base_range[1:] for m in pieces]
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:]))  # consecutive row ranges of the file


def test_a_matrix_split_across_segments_goes_tensor_by_tensor_when_its_rank_is_asked(tiny_gpt2_pair, monkeypatch):
    import subnetscope.segments as segments

    base_dir, tuned_dir, _, _ = tiny_gpt2_pair
    base, tuned = open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir))
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 1000)
    name = "transformer.wte.weight"
    assert batchable(base, tuned, name) and not batchable(base, tuned, name, rank=True)
    assert batchable(base, tuned, "transformer.h.0.ln_1.weight", rank=True)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_pass_counts_the_planted_changes(tiny_gpt2_pair, device):
    base_dir, tuned_dir, counts, _ = tiny_gpt2_pair
    base, tuned = open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir))
    got = {n: s.changed["exact"] for n, s, _ in compare_segments(base, tuned, base.names(), ChangeRules(), device,
                                                                  target_bytes=512)}
    assert {n: c for n, c in got.items() if c} == counts


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_weights_are_counted_and_kept_out_of_the_sums(tmp_path, device):
    base_dir, tuned_dir = _odd_pair(tmp_path)
    base, tuned = open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir))
    got = {n: s for n, s, _ in compare_segments(base, tuned, base.names(), ChangeRules(), device)}
    q = got["model.layers.1.self_attn.q_proj.weight"]
    assert (q.nonfinite_base, q.nonfinite_tuned, q.changed["exact"]) == (1, 5, 4)
    assert math.isfinite(q.base_sq_sum) and math.isfinite(q.abs_sum) and q.finite_count == q.numel - 4
    assert got["model.norm.weight"].changed == {r: 0 for r in RULES}
    assert got["model.layers.1.post_attention_layernorm.weight"].changed["exact"] == 10


def test_segments_are_single_dtype_packed_and_bounded(tiny_gpt2_pair, tmp_path):
    base_dir, tuned_dir = _odd_pair(tmp_path)
    base, tuned = open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir))
    segments = plan_segments(base, tuned, base.names(), target_bytes=500)
    assert sorted(m.name for s in segments for m in s.members) == sorted(base.names())
    for seg in segments:
        assert all(base.dtype(m.name) == seg.dtype for m in seg.members)
        assert [m.start for m in seg.members] == [sum(x.numel for x in seg.members[:i])
                                                  for i in range(len(seg.members))]
        assert seg.nbytes <= 500 or (len(seg.members) == 1 and seg.members[0].shape[0] == 1)


def test_mismatched_tensors_are_left_to_the_tensor_by_tensor_path(tmp_path):
    a = {"w": torch.zeros(4, 3), "v": torch.zeros(5), "u": torch.zeros(2, dtype=torch.bfloat16),
         "i": torch.zeros(3, dtype=torch.int64)}
    b = {"w": torch.zeros(5, 3), "v": torch.zeros(5, dtype=torch.float16), "u": torch.zeros(2, dtype=torch.bfloat16),
         "i": torch.zeros(3, dtype=torch.int64)}
    base = open_checkpoint(str(save_state(tmp_path / "a", a)))
    tuned = open_checkpoint(str(save_state(tmp_path / "b", b)))
    assert [n for n in ("w", "v", "u", "i") if batchable(base, tuned, n)] == ["u"]


def test_a_file_cut_short_is_a_one_line_error(tiny_gpt2_pair):
    base_dir, tuned_dir, _, _ = tiny_gpt2_pair
    base, tuned = open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir))
    path = tuned_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # opened intact, cut before the read
    with pytest.raises(SubnetscopeError, match="cut short"):
        list(compare_segments(base, tuned, base.names(), ChangeRules(), "cpu"))


def _nonfinite_pair(tmp_path):
    """Hand-built tensors for the non-finite rules and the all-zero base, with their hand counts
    (exact, atol, relative); a finite member shares each segment with them."""
    inf, nan = float("inf"), float("nan")
    cases = {  # name: (base, tuned, counts)
        "repro": (REPRO_BASE, REPRO_TUNED, 4),
        "inf_only": ([0.0, 1.0, 2.0, 3.0], [inf, -inf, 2.0, 3.0], 2),  # Σ|Δ| is inf, not NaN
        "flip": ([inf, 1.0], [-inf, 1.0], 1),
        "base_inf": ([inf, 1.0, 2.0], [1.0, 1.0, 2.0], 1),
        "same_nonfinite": ([inf, nan, 1.0], [inf, nan, 1.0], 0),
        "finite": ([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.5], 1),
        "zero_base": ([0.0, 0.0, 0.0], [0.0, 3.0, 4.0], 2),
    }
    base, tuned, want = {}, {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (a, b, n) in cases.items():
            key = f"{name}.{str(dtype).replace('torch.', '')}"
            base[key], tuned[key] = torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)
            want[key] = {r: n for r in RULES}
    return save_state(tmp_path / "nf_base", base), save_state(tmp_path / "nf_tuned", tuned), want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target_bytes", [8, 1 << 30])
def test_batched_pass_counts_nonfinite_changes_by_hand(tmp_path, target_bytes, device):
    base_dir, tuned_dir, want = _nonfinite_pair(tmp_path)
    base, tuned = open_checkpoint(str(base_dir)), open_checkpoint(str(tuned_dir))
    got = {n: s for n, s, _ in compare_segments(base, tuned, base.names(), ChangeRules(), device,
                                                 target_bytes=target_bytes)}
    assert {n: s.changed for n, s in got.items()} == want
    for dtype in ("float32", "bfloat16"):
        assert got[f"zero_base.{dtype}"].relative_norm == math.inf
        assert got[f"same_nonfinite.{dtype}"].relative_norm == 0.0
        assert got[f"finite.{dtype}"].relative_norm == pytest.approx(0.5 / math.sqrt(30))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("target_bytes", [700, 1 << 30])
def test_batched_pass_with_planted_nonfinite_matches_numpy(tmp_path, target_bytes, device):
    """Random tensors with NaN/±inf on both sides, some segments free of them: every count equals
    the float64 numpy rules', and every statistic diff_stats'."""
    rules = ChangeRules(atol=1e-5, eta=1e-3)
    shapes = {"model.layers.0.mlp.up_proj.weight": (40, 12), "model.layers.0.mlp.down_proj.weight": (12, 40),
              "model.layers.0.input_layernorm.weight": (300,), "model.norm.weight": (7,)}
    base, tuned = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            key = f"{name}.{str(dtype).replace('torch.', '')}" if dtype != torch.float32 else name
            base[key], tuned[key] = planted_pair(shape, dtype, seed=i)
    clean = "model.layers.1.self_attn.q_proj.weight"  # a finite member: the fast path, no recomputation
    base[clean] = torch.randn(30, 20, generator=torch.Generator().manual_seed(9))
    tuned[clean] = plant({clean: base[clean]}, {clean: 50})[clean]
    base_src = open_checkpoint(str(save_state(tmp_path / "p_base", base)))
    tuned_src = open_checkpoint(str(save_state(tmp_path / "p_tuned", tuned)))
    seen = 0
    for name, stats, _ in compare_segments(base_src, tuned_src, base_src.names(), rules, device,
                                           target_bytes=target_bytes):
        want = numpy_rules(base[name], tuned[name], rules.atol, rules.eta)
        assert stats.changed == {r: int(want[r].sum()) for r in RULES}, name
        axis = neuron_axis(name, tuple(base[name].shape))
        _assert_same(stats, diff_stats(base[name], tuned[name], rules, per_row_col=axis is not None), name)
        seen += 1
    assert seen == len(base)


def test_engine_reports_an_infinite_relative_norm_for_an_all_zero_base(tmp_path):
    from subnetscope.engine import analyze_pair

    base = {"zero": torch.zeros(3), "still": torch.zeros(2), "w": torch.tensor([3.0, 4.0])}
    tuned = {"zero": torch.tensor([0.0, 3.0, 4.0]), "still": torch.zeros(2), "w": torch.tensor([3.0, 5.0])}
    result = analyze_pair(open_checkpoint(str(save_state(tmp_path / "zb", base))),
                          open_checkpoint(str(save_state(tmp_path / "zt", tuned))), progress=False, workers=1)
    got = {t.name: t.relative_norm for t in result.tensors}
    assert got == {"zero": math.inf, "still": 0.0, "w": pytest.approx(0.2)}


def _edge_state(finite: bool) -> tuple[dict, dict]:
    """FFN matrices (per-neuron counts), a norm and an attention matrix in bf16, fp16 and fp32, from
    test_changes.edge_pair (NaN/±inf, ±0, subnormals, overflowing |Δ|); `finite`: only ±0 and the
    subnormals, so every member takes the segment path, none the recomputation by diff_stats."""
    shapes = {"mlp.up_proj.weight": (24, 10), "mlp.down_proj.weight": (10, 24), "input_layernorm.weight": (50,),
              "self_attn.q_proj.weight": (12, 10)}
    base, tuned = {}, {}
    for layer, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):  # a layer per dtype
        for i, (module, shape) in enumerate(shapes.items()):
            a, b = edge_pair(shape, dtype, seed=i)
            if finite:
                odd = ~(torch.isfinite(a) & torch.isfinite(b)) | (a.float().abs() > 1e4) | (b.float().abs() > 1e4)
                a, b = torch.where(odd, 0.5, a.float()).to(dtype), torch.where(odd, 0.5, b.float()).to(dtype)
            base[f"model.layers.{layer}.{module}"], tuned[f"model.layers.{layer}.{module}"] = a, b
    return base, tuned


def _assert_segments_equal_reference(tmp_path, finite: bool, rules: ChangeRules, target_bytes: int, device: str):
    base, tuned = _edge_state(finite)
    folder = tmp_path / f"edge_{finite}_{target_bytes}"
    base_src = open_checkpoint(str(save_state(folder / "base", base)))
    tuned_src = open_checkpoint(str(save_state(folder / "tuned", tuned)))
    seen = []
    for name, stats, _ in compare_segments(base_src, tuned_src, base_src.names(), rules, device,
                                           target_bytes=target_bytes):
        axis = neuron_axis(name, tuple(base[name].shape))
        assert_stats_equal(stats, reference_stats(base[name], tuned[name], rules, per_row_col=axis is not None))
        seen.append(name)
    assert sorted(seen) == sorted(base)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("finite", [True, False], ids=["segment_path", "with_nonfinite"])
@pytest.mark.parametrize("target_bytes", [300, 1 << 30])
def test_batched_pass_equals_the_reference(tmp_path, finite, target_bytes, device):
    """Every statistic of the batched pass, per-neuron counts included, is the reference's, whole or
    cut into pieces, under thresholds that make |Δ| and η·max|w| overflow."""
    for rules in EDGE_RULES:
        _assert_segments_equal_reference(tmp_path, finite, rules, target_bytes, device)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_pass_counts_a_new_rule(tmp_path, monkeypatch, device):
    """A rule added only to changes.TOLERANCE is counted per tensor and per neuron by the segments."""
    add_rule(monkeypatch, "loose", loose)
    rules = ChangeRules(atol=1e-4, eta=1e-3)
    _assert_segments_equal_reference(tmp_path, True, rules, 1 << 30, device)
    base, tuned = _edge_state(True)
    base_src = open_checkpoint(str(save_state(tmp_path / "loose_base", base)))
    tuned_src = open_checkpoint(str(save_state(tmp_path / "loose_tuned", tuned)))
    for name, stats, _ in compare_segments(base_src, tuned_src, base_src.names(), rules, device):
        want = numpy_rules(base[name], tuned[name], 100 * rules.atol, rules.eta)["atol"]
        assert list(stats.changed) == ["exact", "atol", "relative", "loose"]
        assert stats.changed["loose"] == int(want.sum()), name
        if "mlp" in name:  # FFN matrices: per-neuron counts
            assert stats.row_changed["loose"].tolist() == want.reshape(base[name].shape).sum(1).tolist(), name
            assert stats.col_changed["loose"].tolist() == want.reshape(base[name].shape).sum(0).tolist(), name
