"""Importance scores, mask selection and the mask file, each against an independent computation,
then compute_masks.py end to end and its bad-input errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subnetscope.errors import SubnetscopeError
from subnetscope.importance import (
    importance_scores,
    kth_smallest,
    nm_masks,
    prunable_tensors,
    random_scores,
    select_masks,
    smallest_global,
    structured_masks,
    unit_groups,
)
from subnetscope.masks import (
    MaskSet,
    check_masks_fit,
    fingerprint_of,
    load_masks,
    save_masks,
)
from subnetscope.models import tiny_model

from .conftest import IMDB_JSONL, SIDE_BY_SIDE, at_once, requires_shared

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "compute_masks.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)


def test_kth_smallest_equals_sorting_everything():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.rand(50, 7, generator=gen), torch.zeros(13), torch.rand(300, generator=gen) * 1e-30,
               torch.tensor([0.5, 0.5, 0.5, 2.0])]
    flat = torch.cat([t.reshape(-1) for t in tensors]).sort().values
    for k in (1, 2, 13, 14, 100, 350, flat.numel() - 3, flat.numel()):
        assert kth_smallest(tensors, k) == flat[k - 1].item()


def test_global_selection_takes_exactly_k_with_ties():
    scores = {"a": torch.tensor([[0.1, 0.3], [0.3, 0.9]]), "b": torch.tensor([0.3, 0.3, 0.05, 1.0])}
    picked = smallest_global(scores, 4)  # 0.05, 0.1 and two of the four 0.3s, in tensor order
    assert sum(int(p.sum()) for p in picked.values()) == 4
    assert picked["a"].tolist() == [[True, True], [True, False]] and picked["b"].tolist() == [False, False, True, False]


def _linear_model():
    return tiny_model("gpt2", vocab_size=64, n_layer=2)


def test_matrix_row_and_global_groups_by_hand():
    model = _linear_model()
    tensors = prunable_tensors(model)
    scores = importance_scores(model, tensors, "magnitude")
    per_matrix = select_masks(scores, tensors, 0.3, "unstructured", "matrix")
    for name, keep in per_matrix.items():
        w = tensors[name].param.detach().abs().reshape(-1)
        k = round(0.3 * w.numel())
        assert int((~keep).sum()) == k
        assert w[~keep.reshape(-1)].max() <= w[keep.reshape(-1)].min()
    per_row = select_masks(scores, tensors, 0.25, "unstructured", "row")
    for name, keep in per_row.items():
        # GPT-2's Conv1D is [in, out]: an output row is a column
        removed_per_output = (~keep).sum(dim=0)
        assert (removed_per_output == round(0.25 * keep.shape[0])).all(), name
    global_keep = select_masks(scores, tensors, 0.6, "unstructured", "global")
    everything = torch.cat([scores[n].reshape(-1) for n in tensors])
    k = round(0.6 * everything.numel())
    threshold = everything.sort().values[k - 1]
    removed = torch.cat([(~global_keep[n]).reshape(-1) for n in tensors])
    assert int(removed.sum()) == k and everything[removed].max() == threshold


def test_gradient_taylor_and_wanda_scores_against_direct_computation():
    model = _linear_model().eval()
    tensors = prunable_tensors(model)
    batches = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    grad = importance_scores(model, tensors, "gradient", batches)
    taylor = importance_scores(model, tensors, "taylor", batches)
    name = "transformer.h.1.mlp.c_fc.weight"
    w = dict(model.named_parameters())[name]
    expect_g, expect_t = torch.zeros_like(w), torch.zeros_like(w)
    for b in batches:
        (g,) = torch.autograd.grad(model(input_ids=b, labels=b).loss, [w])
        expect_g += g.abs()
        expect_t += (g * w).abs()
    assert torch.allclose(grad[name], expect_g, rtol=1e-5, atol=1e-9)
    assert torch.allclose(taylor[name], expect_t.detach(), rtol=1e-5, atol=1e-9)
    wanda = importance_scores(model, tensors, "wanda", batches)
    # c_fc's input is ln_2 of the hidden state after block 1's attention: recompute it from hidden states
    block = model.transformer.h[1]
    sq = torch.zeros(w.shape[0])
    with torch.no_grad():
        for b in batches:
            hidden = model(input_ids=b, output_hidden_states=True).hidden_states[1]
            after_attn = hidden + block.attn(block.ln_1(hidden))[0]
            sq += block.ln_2(after_attn).reshape(-1, w.shape[0]).square().sum(0)
    assert torch.allclose(wanda[name], w.detach().abs() * sq.sqrt().view(-1, 1), rtol=1e-4)


def test_structured_masks_remove_whole_neurons_and_heads():
    model = _linear_model()
    tensors = prunable_tensors(model)
    scores = {n: torch.ones(t.param.shape) for n, t in tensors.items()}
    scores["transformer.h.0.mlp.c_fc.weight"][:, [3, 7]] = 0.0  # neurons 3 and 7 matter least
    scores["transformer.h.0.attn.c_attn.weight"][:, 16:32] = 0.0  # head 1 of q (n_embd 32, 2 heads)
    groups = unit_groups(model, tensors)
    assert {g.label for g in groups} == {"layer 0 mlp", "layer 0 attn", "layer 1 mlp", "layer 1 attn"}
    keep = structured_masks(scores, groups, 2 / 128)
    fc, proj = keep["transformer.h.0.mlp.c_fc.weight"], keep["transformer.h.0.mlp.c_proj.weight"]
    assert sorted((~fc).all(0).nonzero().reshape(-1).tolist()) == [3, 7] and int((~fc).sum()) == 2 * 32
    assert sorted((~proj).all(1).nonzero().reshape(-1).tolist()) == [3, 7] and int((~proj).sum()) == 2 * 32
    heads = structured_masks(scores, groups, 0.5)
    qkv, out = heads["transformer.h.0.attn.c_attn.weight"], heads["transformer.h.0.attn.c_proj.weight"]
    dropped_cols = (~qkv).all(0).nonzero().reshape(-1).tolist()
    assert dropped_cols == list(range(16, 32)) + list(range(48, 64)) + list(range(80, 96))  # head 1 of q, k, v
    assert (~out).all(1).nonzero().reshape(-1).tolist() == list(range(16, 32))


def test_structured_on_gemma3n_prunes_query_heads_and_ffn_neurons():
    model = tiny_model("gemma3n", vocab_size=64)
    tensors = prunable_tensors(model)
    scores = importance_scores(model, tensors, "magnitude")
    keep = structured_masks(scores, unit_groups(model, tensors), 0.5)
    q, o = keep["model.layers.0.self_attn.q_proj.weight"], keep["model.layers.0.self_attn.o_proj.weight"]
    assert int((~q).all(1).sum()) == 16 and int((~o).all(0).sum()) == 16  # one of two heads of 16 dims
    assert keep["model.layers.0.self_attn.k_proj.weight"].all()  # shared K/V heads stay
    gate, up, down = (keep[f"model.layers.0.mlp.{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj"))
    assert torch.equal((~gate).all(1), (~up).all(1)) and torch.equal((~gate).all(1), (~down).all(0))
    assert int((~gate).all(1).sum()) == 32


def test_nm_keeps_the_n_largest_of_every_m_inputs():
    model = _linear_model()
    tensors = prunable_tensors(model)
    scores = importance_scores(model, tensors, "magnitude")
    keep = nm_masks(scores, tensors, 2, 4)
    for name, k in keep.items():
        groups = k.movedim(0, -1).reshape(-1, 4)  # Conv1D: inputs on axis 0
        values = scores[name].movedim(0, -1).reshape(-1, 4)
        assert (groups.sum(1) == 2).all()
        assert (values.masked_fill(~groups, float("inf")).min(1).values
                >= values.masked_fill(groups, -1).max(1).values).all()


def test_random_baseline_is_seeded_and_exact():
    model = _linear_model()
    tensors = prunable_tensors(model)
    a = select_masks(random_scores(tensors, 3), tensors, 0.4, "random", "matrix")
    b = select_masks(random_scores(tensors, 3), tensors, 0.4, "random", "matrix")
    c = select_masks(random_scores(tensors, 4), tensors, 0.4, "random", "matrix")
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    assert all(int((~m).sum()) == round(0.4 * m.numel()) for m in a.values())


def test_mask_file_round_trip_is_bit_packed(tmp_path):
    model = _linear_model()
    gen = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(t.param.shape, generator=gen) > 0.3 for n, t in prunable_tensors(model).items()}
    path = save_masks(tmp_path / "m.safetensors", MaskSet(masks, {"method": "test"}, fingerprint_of(model)))
    back = load_masks(path)
    assert back.settings == {"method": "test"} and back.fingerprint == fingerprint_of(model)
    assert all(torch.equal(back.masks[n], masks[n]) for n in masks)
    bits = sum(m.numel() for m in masks.values())
    assert path.stat().st_size < bits / 8 + 4096  # one bit per weight plus the header
    check_masks_fit(back, dict(model.named_parameters()))


def test_misfitting_masks_are_refused_with_their_names(tmp_path):
    model = _linear_model()
    other = tiny_model("gpt2", vocab_size=64, n_layer=2, n_embd=16)
    masks = {n: torch.ones(t.param.shape, dtype=torch.bool) for n, t in prunable_tensors(other).items()}
    with pytest.raises(SubnetscopeError,
                       match=r"shapes differ: transformer\.h\.0\.attn\.c_attn\.weight \(mask \[16, 48\]"):
        check_masks_fit(MaskSet(masks, {}, fingerprint_of(other)), dict(model.named_parameters()))
    with pytest.raises(SubnetscopeError, match="not in the model: transformer.h.5.mlp.c_fc.weight"):
        check_masks_fit(MaskSet({"transformer.h.5.mlp.c_fc.weight": torch.ones(2, 2, dtype=torch.bool)}),
                        dict(model.named_parameters()))
    bigger_vocab = tiny_model("gpt2", vocab_size=80, n_layer=2)
    same_shapes = {n: torch.ones(t.param.shape, dtype=torch.bool) for n, t in prunable_tensors(bigger_vocab).items()}
    with pytest.raises(SubnetscopeError, match="was made for"):
        check_masks_fit(MaskSet(same_shapes, {"model": "x"}, fingerprint_of(bigger_vocab)),
                        dict(model.named_parameters()))


BAD_INPUT = [
    (["--sparsity", "1.0"], "must be in [0, 1)"),
    (["--importance", "gradient"], "needs data"),
    (["--method", "nm", "--sparsity", "0.5"], "drop --sparsity"),
    (["--method", "nm", "--nm", "2-4"], "write it as N:M"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """This file's compute_masks.py commands, all at once: every level for tiny-gpt2 ("levels"), wanda with
    calibration data ("calibration", where ../shared has it) and each bad input (by its message). Their folder
    (a subfolder each, by name or bad input's index), and each result by name."""
    tmp = tmp_path_factory.mktemp("compute_masks")
    commands = {"levels": ["--policy", "tiny-gpt2", "--output_dir", str(tmp / "levels")],
                **{message: ["--policy", "tiny-gpt2", "--output_dir", str(tmp / str(i)), *args]
                   for i, (args, message) in enumerate(BAD_INPUT)}}
    if IMDB_JSONL.exists():
        commands["calibration"] = ["--policy", "tiny-gemma3n", "--output_dir", str(tmp / "calibration"),
                                   "--sparsity", "0.5", "--importance", "wanda", "--group", "row", "--calib_data",
                                   str(IMDB_JSONL), "--calib_seq_len", "16", "--calib_batches", "2", "--no-plot"]
    env = {**os.environ, **SIDE_BY_SIDE}
    return tmp, dict(zip(commands, at_once(*(lambda c=c: run_cli(*c, env=env) for c in commands.values()))))


@pytest.mark.slow
def test_compute_masks_cli_writes_every_level_and_a_true_report(cli_runs):
    tmp, results = cli_runs
    out, result = tmp / "levels", results["levels"]
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "validation.json").read_text())
    assert [m["target_sparsity"] for m in report["masks"]] == [round(0.1 * i, 1) for i in range(10)]
    for entry in report["masks"]:
        masks = load_masks(out / entry["file"]).masks
        removed = sum(int((~m).sum()) for m in masks.values())
        assert entry["removed"] == removed and entry["mismatched_tensors"] == []
        assert abs(entry["overall_sparsity"] - entry["target_sparsity"]) < 1e-3
    assert (out / "mask_validation.png").stat().st_size > 1000 and (out / "validation.csv").exists()


@requires_shared(IMDB_JSONL)
@pytest.mark.slow
def test_compute_masks_cli_with_calibration_data(cli_runs):
    tmp, results = cli_runs
    assert results["calibration"].returncode == 0, results["calibration"].stderr
    masks = load_masks(tmp / "calibration" / "mask_unstructured_wanda_row_s0.50.safetensors")
    assert masks.settings["calib_batches"] == 2 and abs(masks.sparsity() - 0.5) < 0.01


@pytest.mark.parametrize("args, message", BAD_INPUT)
@pytest.mark.slow
def test_compute_masks_bad_input_is_one_line(cli_runs, args, message):
    result = cli_runs[1][message]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
