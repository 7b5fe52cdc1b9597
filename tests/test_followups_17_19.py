"""Follow-ups of issues 17 and 19: the text-only fraction in localization_stats.csv, the plan's rank in
gradient_rank.py, structured-pruning refusals before scoring, Phi-3's fused qkv_proj, --reward specs."""
import csv
import json

import pytest
import torch

from subnetscope.models import tiny_model

from .conftest import save_state

VISION = "vision_tower.encoder.layers.0.mlp.fc1.weight"


def multimodal_run(root, text_changed: int):
    """A tiny GPT-2 plus a vision-tower matrix; the last checkpoint changes every vision weight and the
    first `text_changed` entries of the first text block's c_attn."""
    state = {k: v.detach().clone() for k, v in tiny_model("gpt2", vocab_size=64, n_layer=2).state_dict().items()
             if k != "lm_head.weight"}
    state[VISION] = torch.zeros(16, 16)
    save_state(root / "base", state)
    state[VISION] = state[VISION] + 1.0
    flat = state["transformer.h.0.attn.c_attn.weight"].view(-1)
    flat[:text_changed] += 1.0
    save_state(root / "step_10", state)
    return root, state


def test_localization_reports_the_text_models_fraction_without_the_vision_tower(tmp_path):
    from subnetscope.cli.localize import main

    a, state = multimodal_run(tmp_path / "a", text_changed=40)
    b, _ = multimodal_run(tmp_path / "b", text_changed=10)
    out = tmp_path / "cmp"
    main(["--ckpt_dirs", str(a), str(b), "--output_dir", str(out), "--no_tqdm", "--device", "cpu", "--n_boot", "20",
          "--rule", "exact"])
    with open(out / "localization_stats.csv") as fh:
        rows = {r["model"]: r for r in csv.DictReader(fh)}
    total = sum(v.numel() for v in state.values())
    text = total - state[VISION].numel()
    for label, changed in (("a", 40), ("b", 10)):
        assert float(rows[label]["fraction_changed"]) == pytest.approx((changed + 256) / total)
        assert float(rows[label]["fraction_changed_text"]) == pytest.approx(changed / text)


def test_gradient_spectrum_reports_the_plans_rank_of_planted_singular_values():
    from subnetscope.gradrank import spectrum_from_gram

    sigma = torch.tensor([10.0, 2.0, 0.5, 0.2, 0.09, 0.001], dtype=torch.float64)  # 0.01·σ₁ = 0.1: four above
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    s = spectrum_from_gram("m", q @ torch.diag(sigma ** 2) @ q.T)
    torch.testing.assert_close(torch.tensor(s.singular_values, dtype=torch.float64), sigma, rtol=1e-6, atol=1e-6)
    assert (s.plan_rank, s.numerical_rank, s.effective_rank) == (4, 6, 2)  # 100 + 4 of 104.3 in σ₁², σ₂²: 99.7%


def test_gradient_rank_cli_writes_the_plans_rank(tmp_path):
    from subnetscope.cli.gradrank import main

    main(["--reward", "easy", "--dataset", "easy", "--k", "3", "--batch_size", "4", "--max_new_tokens", "4",
          "--device", "cpu", "--output_dir", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    with open(tmp_path / "gradient_rank.csv") as fh:
        rows = list(csv.DictReader(fh))
    with open(tmp_path / "spectra.csv") as fh:
        spectra = list(csv.DictReader(fh))
    for task in ("rl", "sft"):
        plan = sum(float(r["sigma_normalized"]) > 0.01 for r in spectra if r["task"] == task)
        glob = next(r for r in rows if r["task"] == task and r["matrix"] == "global")
        assert int(glob["plan_rank"]) == plan == summary["tasks"][task]["global_plan_rank"]
        assert float(glob["plan_rank_percent"]) == pytest.approx(100 * plan / 3)
        per_matrix = [100 * int(r["plan_rank"]) / 3 for r in rows if r["task"] == task and r["matrix"] != "global"]
        assert summary["tasks"][task]["mean_matrix_plan_rank_percent"] == pytest.approx(
            sum(per_matrix) / len(per_matrix))


def tiny_phi3(kv_heads: int = 4) -> torch.nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2))


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_phi3_fused_qkv_has_no_head_units_and_structured_pruning_refuses_it(kv_heads):
    """Before: 4 heads of 8 with 4 KV heads made qkv_proj 96 rows, read as NeoX's 24 rows per head, so
    "head 0" was q heads 0-2 and no k or v of head 0."""
    from subnetscope.errors import SubnetscopeError
    from subnetscope.importance import prunable_tensors, unit_groups
    from subnetscope.naming import head_units

    model = tiny_phi3(kv_heads)
    weight = model.model.layers[0].self_attn.qkv_proj.weight
    assert weight.shape[0] == (4 + 2 * kv_heads) * 8  # all q | all k | all v
    assert head_units("model.layers.0.self_attn.qkv_proj.weight", tuple(weight.shape), 8) is None
    assert head_units("model.layers.0.self_attn.o_proj.weight", (32, 32), 8)[0] == 1  # its o_proj still splits
    with pytest.raises(SubnetscopeError, match=r"qkv_proj.weight \[\d+, 32\] does not split.*--method unstructured"):
        unit_groups(model, prunable_tensors(model))


def test_structured_refusal_comes_before_any_scoring(tmp_path, capsys, monkeypatch):
    from subnetscope import importance, models
    from subnetscope.cli import compute_masks

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored before the structured layout was checked")

    # compute_masks imports these when it needs them, after its flags are checked
    monkeypatch.setattr(models, "load_causal_lm", lambda *args, **kwargs: tiny_phi3())
    monkeypatch.setattr(importance, "importance_scores", no_scoring)
    monkeypatch.setattr(importance, "random_scores", no_scoring)
    with pytest.raises(SystemExit) as exc:
        compute_masks.main(["--policy", "phi3", "--method", "structured", "--sparsity", "0.5", "--device", "cpu",
                            "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: structured pruning: "), err
    assert "qkv_proj" in lines[0] and "Traceback" not in err and not (tmp_path / "out").exists()


def test_main_sft_takes_a_reward_callable_and_refuses_a_bad_one_in_one_line(tmp_path, capsys):
    from subnetscope.cli import sft

    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("LIMIT = 3\n\ndef by_length(completions, **kwargs):\n"
                       "    return [float(len(c)) for c in completions]\n")
    args = sft.build_parser().parse_args(["--reward", f"{rewards}:by_length"])
    assert sft.config_from_args(args).reward == f"{rewards}:by_length"  # before: refused, not one of the choices
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        sft.main(["--reward", f"{rewards}:LIMIT", "--output_dir", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"error: --reward {rewards}:LIMIT"), err
    assert "LIMIT (int) is not callable" in lines[0] and "Traceback" not in err and not out.exists()


def test_the_shakespeare_pruning_config_holds_the_final_mask():
    from pathlib import Path

    from subnetscope.cli.dataclass_args import config_from_args
    from subnetscope.cli.prune import build_parser
    from subnetscope.prune_trainer import PruneConfig

    path = str(Path(__file__).resolve().parents[1] / "configs" / "prune_shakespeare.yaml")
    assert "hold_final: true" in Path(path).read_text()  # stated, not left to the default
    assert config_from_args(PruneConfig, build_parser().parse_args(["--config", path])).hold_final is True
    assert config_from_args(PruneConfig, build_parser().parse_args(["--config", path, "--no-hold_final"])).hold_final \
        is False
