"""--precision in the RL trainers: fp32 masters judged and published at bf16, resume, bf16's warning, chat templates."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from subnetscope.checkpoint import open_checkpoint
from subnetscope.data import chat_prompts
from subnetscope.errors import SubnetscopeError
from subnetscope.grpo import GRPOConfig, GRPOTrainer
from subnetscope.models import load_causal_lm, tiny_model, word_tokenizer
from subnetscope.precision import BF16_WARNING
from subnetscope.rl import RLConfig

from .conftest import SIDE_BY_SIDE, at_once, kill_when_exists

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", batch_size=4, group_size=2,
            max_new_tokens=6, lr=1e-4, max_steps=3, save_every=1, eval_every=3, no_tqdm=True)
# words of the tiny models' word tokenizer, so that a templated prompt decodes to what the template wrote
TEMPLATE = ("{% for m in messages %}watching {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} honestly{% endif %}")


def grpo(run: Path, **kw) -> GRPOTrainer:
    trainer = GRPOTrainer(GRPOConfig(**{**TINY, "output_dir": str(run), **kw}))
    trainer.train()
    return trainer


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (finite values), in numpy."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def stored_bits(t: torch.Tensor) -> np.ndarray:
    assert t.dtype == torch.bfloat16
    return t.view(torch.int16).numpy().view(np.uint16)


def counts(a: np.ndarray, b: np.ndarray, exact: np.ndarray, atol: float = 1e-5, eta: float = 1e-3) -> dict[str, int]:
    """The three rules on finite float32 values, `exact` being where the stored bits differ."""
    delta = np.abs(b - a)
    return {"exact": int(exact.sum()), "atol": int((exact & (delta > atol)).sum()),
            "relative": int((exact & (delta > np.maximum(np.abs(a) * np.float32(eta),
                                                          np.abs(b) * np.float32(eta)))).sum())}


def theta0() -> dict[str, np.ndarray]:
    model = load_causal_lm("tiny-gpt2", torch.float32, vocab_size=len(word_tokenizer()))
    return {n: p.detach().numpy() for n, p in model.named_parameters()}


def test_mixed_trains_fp32_masters_and_judges_their_bf16_roundings(tmp_path):
    run = tmp_path / "run"
    trainer = grpo(run, precision="mixed")
    assert {p.dtype for p in trainer.params.values()} == {torch.float32}
    state = trainer.optimizer.state_dict()["state"]
    assert {v.dtype for s in state.values() for k, v in s.items() if k != "step"} == {torch.float32}
    assert {p.dtype for p in trainer.ref.parameters()} == {torch.bfloat16}
    theta0_buffer = trainer.tracker.groups[0].initial.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == theta0_buffer  # the reference lives in the tracker's θ0 buffer
               for p in trainer.ref.parameters())
    settings = json.loads((run / "run_config.json").read_text())["settings"]
    assert (settings["precision"], settings["view_dtype"]) == ("mixed", None)
    assert (settings["precision_used"], settings["view_dtype_used"]) == ("mixed", "bfloat16")

    start = theta0()
    total = sum(v.size for v in start.values())
    start_bits = {n: bf16_bits(v) for n, v in start.items()}
    base = load_file(str(run / "base" / "model.safetensors"))
    assert json.loads((run / "base" / "config.json").read_text())["dtype"] == "bfloat16"
    for name in start:
        assert np.array_equal(stored_bits(base[name]), start_bits[name]), name
    records = read_metrics(run)
    for record in records:
        step = record["step"]
        masters = load_file(str(run / f"step_{step}" / "master.safetensors"))
        compact = load_file(str(run / f"step_{step}" / "subnet.safetensors"))
        assert {t.dtype for k, t in compact.items() if k.endswith("::values")} == {torch.bfloat16}
        stored = open_checkpoint(str(run / f"step_{step}"))
        assert set(masters) == set(start) and {m.dtype for m in masters.values()} == {torch.float32}
        view, master = {"exact": 0, "atol": 0, "relative": 0}, {"exact": 0, "atol": 0, "relative": 0}
        for name, w0 in start.items():
            w = masters[name].numpy()
            bits = bf16_bits(w)
            assert np.array_equal(stored_bits(stored.get(name)), bits), (step, name)  # step_N = the rounded masters
            for rule, n in counts(bf16_values(start_bits[name]), bf16_values(bits), bits != start_bits[name]).items():
                view[rule] += n
            for rule, n in counts(w0, w, w0.view(np.uint32) != w.view(np.uint32)).items():
                master[rule] += n
        for rule in ("exact", "atol", "relative"):
            assert record[f"changed/{rule}"] == view[rule] / total, (step, rule)
            assert record[f"changed_master/{rule}"] == master[rule] / total, (step, rule)
        assert 0 < view["exact"] < master["exact"]  # updates below half a bf16 step are not published
    final = load_file(str(run / "final" / "model.safetensors"))
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    last = load_file(str(run / "step_3" / "master.safetensors"))
    assert all(np.array_equal(stored_bits(final[n]), bf16_bits(last[n].numpy())) for n in start)


def test_fp32_is_judged_in_fp32_without_masters(tmp_path):
    run = tmp_path / "run"
    trainer = grpo(run, precision="fp32", max_steps=1)
    assert trainer.master_tracker is None and {p.dtype for p in trainer.ref.parameters()} == {torch.float32}
    assert not (run / "step_1" / "master.safetensors").exists()
    assert not any(k.startswith("changed_master/") for k in read_metrics(run)[0])
    assert {t.dtype for t in load_file(str(run / "base" / "model.safetensors")).values()} == {torch.float32}


def test_fp32_judged_at_bf16_keeps_its_reference_in_fp32(tmp_path):
    run = tmp_path / "run"
    trainer = grpo(run, precision="fp32", view_dtype="bfloat16", max_steps=1, full_checkpoints=True)
    assert {p.dtype for p in trainer.ref.parameters()} == {torch.float32}  # fp32 compute: no rounded reference
    assert trainer.tracker.initial["transformer.h.0.attn.c_attn.weight"].dtype == torch.bfloat16
    assert "changed_master/exact" in read_metrics(run)[0]
    full = load_file(str(run / "step_1" / "model.safetensors"))
    masters = load_file(str(run / "step_1" / "master.safetensors"))
    assert ({t.dtype for t in full.values()} == {torch.bfloat16}
            and {t.dtype for t in masters.values()} == {torch.float32})
    assert all(torch.equal(full[n], masters[n].to(torch.bfloat16)) for n in masters)


def test_bf16_warns_once_and_trains_bf16_weights(tmp_path, capsys):
    from subnetscope.cli import grpo as grpo_cli

    capsys.readouterr()
    grpo_cli.main(["--easy", "--policy", "tiny-gpt2", "--device", "cpu", "--precision", "bf16", "--batch_size", "2",
                   "--max_new_tokens", "4", "--max_steps", "1", "--save_every", "1", "--output_dir",
                   str(tmp_path / "run"), "--no_tqdm"])
    err = capsys.readouterr().err
    assert err.count(BF16_WARNING) == 1, err
    settings = json.loads((tmp_path / "run" / "run_config.json").read_text())["settings"]
    assert (settings["precision_used"], settings["view_dtype_used"]) == ("bf16", "bfloat16")
    assert not (tmp_path / "run" / "step_1" / "master.safetensors").exists()
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert {t.dtype for t in final.values()} == {torch.bfloat16}


def test_bad_precision_settings_are_refused_before_anything(tmp_path):
    for kw, flag in (({"precision": "fp16"}, "--precision 'fp16'"), ({"view_dtype": "int8"}, "--view_dtype 'int8'"),
                     ({"precision": "bf16", "view_dtype": "float32"}, "--view_dtype must be bfloat16")):
        with pytest.raises(SubnetscopeError, match=flag):
            GRPOTrainer(GRPOConfig(**{**TINY, "output_dir": str(tmp_path / "run"), **kw}))
    assert not (tmp_path / "run").exists()


def cli(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "main_grpo.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env or os.environ)


VOLATILE = ("time/", "throughput/", "memory/")


@pytest.mark.slow
def test_resume_after_kill_under_mixed_is_bit_identical(tmp_path):
    args = ["--easy", "--policy", "tiny-gpt2", "--device", "cpu", "--precision", "mixed", "--batch_size", "4",
            "--max_new_tokens", "16", "--lr", "1e-4", "--max_steps", "6", "--save_every", "2", "--eval_every", "3",
            "--no_tqdm"]
    killed, env = tmp_path / "killed", {**os.environ, **SIDE_BY_SIDE}

    def killed_then_resumed():
        kill_when_exists([str(ROOT / "main_grpo.py"), *args, "--output_dir", str(killed)], ROOT, killed / "step_2",
                         env=env)
        assert not (killed / "step_6").exists(), "the run finished before it could be killed"
        return cli(*args, "--output_dir", killed, "--resume", env=env)

    full, resumed = at_once(lambda: cli(*args, "--output_dir", tmp_path / "full", env=env), killed_then_resumed)
    assert full.returncode == 0, full.stderr
    assert resumed.returncode == 0, resumed.stderr
    for step in (4, 6):
        for name in ("subnet.safetensors", "master.safetensors", "tracker.safetensors"):
            a = load_file(str(tmp_path / "full" / f"step_{step}" / name))
            b = load_file(str(killed / f"step_{step}" / name))
            assert a.keys() == b.keys() and any(k.startswith("master::") for k in a) == (name == "tracker.safetensors")
            assert all(torch.equal(a[k], b[k]) for k in a), (step, name)
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(killed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_metrics(tmp_path / "full")]
    assert strip == [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in read_metrics(killed)]


def test_resume_restores_the_masters_not_their_roundings(tmp_path):
    run = tmp_path / "run"
    first = grpo(run, precision="mixed", max_steps=2)
    masters = {n: p.detach().clone() for n, p in first.params.items()}
    first_changed = {n: t.clone() for n, t in first.master_tracker.first_changed.items()}
    resumed = GRPOTrainer(GRPOConfig(**{**TINY, "output_dir": str(run), "precision": "mixed", "max_steps": 3,
                                        "resume": True}))
    assert resumed.start_step == 2
    assert all(torch.equal(p, masters[n]) for n, p in resumed.params.items())
    assert all(torch.equal(t, first_changed[n]) for n, t in resumed.master_tracker.first_changed.items())
    assert all(torch.equal(resumed.tracker.previous[n], masters[n].to(torch.bfloat16)) for n in masters)


def test_a_mixed_step_without_masters_resumes_from_the_one_before(tmp_path, capsys):
    run = tmp_path / "run"
    grpo(run, precision="mixed", max_steps=2)
    (run / "step_2" / "master.safetensors").unlink()
    capsys.readouterr()
    resumed = GRPOTrainer(GRPOConfig(**{**TINY, "output_dir": str(run), "precision": "mixed", "max_steps": 3,
                                        "resume": True}))
    assert resumed.start_step == 1 and "resuming back to step_1" in capsys.readouterr().out


def test_ppo_under_mixed(tmp_path):
    from subnetscope.ppo import PPOConfig, PPOTrainer

    config = dict(policy="tiny-gpt2", reward="easy", dataset="easy", device="cpu", precision="mixed", batch_size=4,
                  mini_batch_size=2, ppo_epochs=1, max_new_tokens=6, lr=1e-4, max_steps=2, save_every=1,
                  eval_every=2, output_dir=str(tmp_path / "run"), no_tqdm=True)
    trainer = PPOTrainer(PPOConfig(**config))
    trainer.train()
    assert {p.dtype for p in trainer.params.values()} == {torch.float32}
    assert {p.dtype for p in trainer.extra_modules["value_head"].parameters()} == {torch.float32}
    record = read_metrics(tmp_path / "run")[-1]
    assert 0 < record["changed/exact"] < record["changed_master/exact"] and "eval/greedy/kl" in record
    step = tmp_path / "run" / "step_2"
    assert {"master.safetensors", "extra.safetensors", "subnet.safetensors"} <= {p.name for p in step.iterdir()}
    masters = load_file(str(step / "master.safetensors"))
    assert all(torch.equal(masters[n], p.detach()) for n, p in trainer.params.items())
    resumed = PPOTrainer(PPOConfig(**{**config, "max_steps": 3, "resume": True}))
    assert resumed.start_step == 2 and all(torch.equal(masters[n], p) for n, p in resumed.params.items())


# ---- chat templates ----

def templated_tokenizer():
    tok = word_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def test_chat_prompts_apply_the_template_or_leave_plain_text():
    assert chat_prompts(templated_tokenizer(), ["a film", "b"]) == ["watching a film honestly", "watching b honestly"]
    assert chat_prompts(word_tokenizer(), ["a film"]) == ["a film"]


@pytest.mark.parametrize("template", [True, False])
def test_rl_rollouts_and_evaluation_see_the_chat_template(tmp_path, template):
    tok = templated_tokenizer()
    folder = tmp_path / "instruct"
    tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    seen: list[str] = []

    def reward(prompts, completions, ids):
        seen.extend(prompts)
        return [0.0] * len(completions)

    trainer = GRPOTrainer(GRPOConfig(**{**TINY, "policy": str(folder), "precision": "fp32", "max_steps": 1,
                                        "eval_every": 1, "chat_template": template,
                                        "output_dir": str(tmp_path / "run")}), reward_fn=reward)
    prompts, rollout = trainer._rollout(1)
    shown = tok.batch_decode(rollout.prompt_ids, skip_special_tokens=True)
    expected = [f"watching {p.lower()} honestly" if template else p.lower() for p in prompts]
    assert [s.strip() for s in shown] == [" ".join(tok.tokenize(e)) for e in expected]
    trainer.evaluate()
    assert seen and all(p in trainer.prompts + trainer.eval_prompts for p in seen)  # rewards see the plain text
    assert all("watching" not in p for p in seen)
    settings = json.loads((tmp_path / "run" / "run_config.json").read_text())["settings"]
    assert settings["chat_template"] is template and settings["chat_template_applied"] is template


def test_no_chat_template_flag():
    from subnetscope.cli import ppo as ppo_cli
    from subnetscope.cli.training import config_from_args
    from subnetscope.ppo import PPOConfig

    assert RLConfig().chat_template
    args = ppo_cli.build_parser().parse_args(["--no_chat_template", "--precision", "mixed", "--view_dtype", "float16"])
    cfg = config_from_args(PPOConfig, args)
    assert (cfg.chat_template, cfg.precision, cfg.view_dtype) == (False, "mixed", "float16")


@pytest.mark.slow
def test_bench_grpo_tiny_runs_on_cpu(tmp_path):
    """Every configuration, in two benchmarks side by side (ours with TRL for their ratio, and the others)."""
    def bench(*configs):
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_grpo.py"), "--tiny", "--workdir",
                               str(tmp_path / configs[0]), "--configs", *configs], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, **SIDE_BY_SIDE})

    result, others = at_once(lambda: bench("ours", "trl"), lambda: bench("naive", "trl_tracked"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tracker overhead, ours" in result.stdout and "ours / TRL" in result.stdout and "mixed" in result.stdout
    assert others.returncode == 0, others.stderr[-3000:]
    assert "tracker overhead, naive" in others.stdout and "SubnetTrackerCallback on TRL" in others.stdout


def test_mixed_rollouts_sample_from_the_masters_bf16_rounding(tmp_path):
    trainer = grpo(tmp_path / "run", precision="mixed", max_steps=2)
    sampler = trainer._refreshed_sampler()
    assert sampler is not trainer.policy and not any(p.requires_grad for p in sampler.parameters())
    masters = dict(trainer.policy.named_parameters())
    for name, p in sampler.named_parameters():
        assert p.dtype == torch.bfloat16
        expected = bf16_bits(masters[name].detach().numpy())  # independent RNE rounding
        assert np.array_equal(stored_bits(p.detach()), expected), name
    assert any(not torch.equal(p.float(), masters[n].detach()) for n, p in sampler.named_parameters())
    fp32 = grpo(tmp_path / "fp32", precision="fp32", max_steps=1)
    assert fp32.sampler is None and fp32._refreshed_sampler() is fp32.policy
