"""Crossing over with TRL: subnetscope's rewards as TRL reward_funcs, TRL-style rewards in main_grpo.py
(--reward module:function), TRL's spellings of shared settings, the accelerate launch that starts fewer
processes than it asked for, numpy's RNG on resume, and step checkpoints exported for from_pretrained."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerState

from subnetscope.arithmetic import ArithmeticReward
from subnetscope.checkpoint import save_compact
from subnetscope.cli import export as export_cli
from subnetscope.cli import grpo, ppo
from subnetscope.errors import SubnetscopeError
from subnetscope.launch import launch_mismatch, requested_processes
from subnetscope.models import tiny_model, word_tokenizer
from subnetscope.reward_import import import_reward
from subnetscope.rewards import EasyReward, VaderReward, build_reward
from subnetscope.runstate import rng_state, set_rng_state

PROMPTS = ["What is 2 + 3? Give the final answer as a number.", "What is 4 * 5? Give the final answer as a number."]
COMPLETIONS = ["A lovely film. The answer is 5.", "A dreadful mess, it is 21."]
IDS = [[2, 4, 5], [1, 3]]


def trl_keywords() -> dict:
    """What TRL's GRPOTrainer / RLOOTrainer pass a reward besides prompts, completions and completion_ids."""
    return {"trainer_state": TrainerState(), "log_extra": lambda *a, **k: None, "log_metric": lambda *a, **k: None,
            "answer": ["5", "20"]}


def test_rewards_are_trl_reward_funcs():
    """Called as TRL calls them (keywords, its extras and the data set's columns) and as our loops do
    (positional): the same scores, checked against values computed here."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = [SentimentIntensityAnalyzer().polarity_scores(c)["compound"] for c in COMPLETIONS]
    for reward, expected in ((EasyReward(), [2 / 3, 0.0]), (ArithmeticReward(), [1.0, 0.0]), (VaderReward(), vader)):
        assert reward(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=IDS, **trl_keywords()) == expected
        assert reward(PROMPTS, COMPLETIONS, IDS) == expected
    assert vader[0] > 0 > vader[1]


def test_rewards_score_conversational_samples_on_their_text():
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    reward = VaderReward()
    assert reward(prompts=prompts, completions=completions, completion_ids=IDS) == reward(PROMPTS, COMPLETIONS, IDS)


REWARD_FILE = '''
def quarter(completions, **kwargs):
    return [0.25 for _ in completions]

def by_length(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]

def positional_only(a, b):
    return []

LIMIT = 3
'''


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARD_FILE))
    return path


def test_a_trl_style_reward_by_file_or_module(reward_file, monkeypatch):
    reward = build_reward(f"{reward_file}:by_length", "unused", "cpu")
    assert reward(PROMPTS, COMPLETIONS, IDS) == [3.0, 2.0]
    monkeypatch.chdir(reward_file.parent)
    assert import_reward("my_rewards:quarter")(PROMPTS, COMPLETIONS, IDS) == [0.25, 0.25]


@pytest.mark.parametrize("attribute, message", [
    ("missing", "has no 'missing'"), ("LIMIT", "LIMIT (int) is not callable"),
    ("positional_only", "does not take TRL's keywords"),
])
def test_bad_reward_callables_are_refused_at_parse_time(reward_file, tmp_path, capsys, attribute, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as done:
        grpo.main(["--reward", f"{reward_file}:{attribute}", "--output_dir", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error: --reward")
    assert message in err[0] and "Traceback" not in err[0] and not out.exists()


def test_a_reward_module_that_does_not_import_is_refused(capsys):
    with pytest.raises(SystemExit) as done:
        grpo.main(["--reward", "no_such_module_here:f", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and err == ["error: --reward no_such_module_here:f: no module named "
                                            "'no_such_module_here': pass --reward module:function (an importable "
                                            "module or a .py file, and a callable in it)"]


def test_main_grpo_trains_on_a_trl_style_reward(reward_file, tmp_path):
    out = tmp_path / "run"
    assert grpo.main(["--policy", "tiny-gpt2", "--reward", f"{reward_file}:quarter", "--dataset", "easy", "--device",
                      "cpu", "--precision", "fp32", "--max_steps", "1", "--batch_size", "2", "--group_size", "2",
                      "--max_new_tokens", "4", "--save_every", "1", "--eval_every", "1", "--output_dir", str(out),
                      "--no_tqdm"]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["reward/mean"] == 0.25
    assert json.loads((out / "run_config.json").read_text())["settings"]["reward"] == f"{reward_file}:quarter"


def test_trl_spellings_of_the_settings(monkeypatch):
    """--num_generations = --group_size, --num_iterations = --inner_epochs, --learning_rate = --lr, and
    --per_device_train_batch_size counts completions per process: --batch_size = it x processes / group."""
    args = grpo.build_parser().parse_args(["--num_generations", "4", "--per_device_train_batch_size", "8",
                                           "--learning_rate", "0.1", "--num_iterations", "2"])
    config = grpo.grpo_config(args)
    assert (config.group_size, config.batch_size, config.lr, config.inner_epochs) == (4, 2, 0.1, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = grpo.grpo_config(grpo.build_parser().parse_args(["--per_device_train_batch_size", "8"]))
    assert config.batch_size == 2 * 8 // config.group_size
    ppo_args = ppo.build_parser().parse_args(["--per_device_train_batch_size", "3", "--learning_rate", "0.01"])
    from subnetscope.cli.training import config_from_args
    from subnetscope.ppo import PPOConfig

    assert (config_from_args(PPOConfig, ppo_args).batch_size, ppo_args.lr) == (6, 0.01)
    with pytest.raises(SystemExit):
        ppo.build_parser().parse_args(["--num_generations", "4"])  # GRPO's setting only


@pytest.mark.parametrize("argv, message", [
    (["--num_generations", "4", "--group_size", "8"], "--num_generations 4 and --group_size 8 name one setting"),
    (["--per_device_train_batch_size", "6", "--group_size", "4"], "is not a multiple of the 4 completions"),
    (["--per_device_train_batch_size", "8", "--group_size", "4", "--batch_size", "3"], "means --batch_size 2 here"),
])
def test_contradicting_trl_spellings_are_refused(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as done:
        grpo.main([*argv, "--output_dir", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "run").exists()


ACCELERATE = ["/usr/bin/python3", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "train.py"]


def test_the_launch_request_is_read_from_accelerates_command_line():
    assert requested_processes(ACCELERATE) == 2
    assert requested_processes(["accelerate", "launch", "--num-processes=3", "train.py"]) == 3
    assert requested_processes(["python", "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes",
                                "4", "x.py"]) == 4
    assert requested_processes(["/usr/bin/python3", "train.py", "--num_processes", "2"]) is None
    assert requested_processes(["torchrun", "--nproc_per_node", "2", "train.py"]) is None
    message = launch_mismatch(1, ACCELERATE)
    assert "asked for 2 processes" in message and "torchrun --nproc_per_node 2" in message
    assert launch_mismatch(2, ACCELERATE) is None


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_warns(tmp_path):
    """The real launcher: `accelerate launch --cpu --num_processes 2` starts one process, which warns."""
    script = tmp_path / "probe.py"
    script.write_text("import os\nfrom subnetscope.launch import warn_launch_mismatch\n"
                      "print('processes', os.environ.get('WORLD_SIZE', '1'))\n"
                      "warn_launch_mismatch(int(os.environ.get('WORLD_SIZE', '1')))\n")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--cpu",
                           "--num_processes", "2", str(script)], capture_output=True, text=True, timeout=300,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    if "asked for" not in done.stderr and done.stdout.count("processes") == 1:
        pytest.skip("the launcher's command line is not readable here (/proc)")
    assert done.stdout.count("processes 1") == 1
    assert "warning: accelerate launch asked for 2 processes (--num_processes 2) but 1 is running" in done.stderr


def test_numpy_random_state_is_restored_exactly():
    """The whole state (key, position, cached Gaussian) comes back through torch.save / weights_only load: the
    draws after a restore equal those after the save (before: the position of a fresh seed)."""
    import io

    np.random.seed(3)
    np.random.rand(5)
    np.random.randn()  # leaves a cached Gaussian
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (np.random.rand(3), np.random.randn(3))
    np.random.rand(100)
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    restored = (np.random.rand(3), np.random.randn(3))
    assert all(np.array_equal(a, b) for a, b in zip(expected, restored))


def test_a_compact_step_is_exported_for_from_pretrained(tmp_path, capsys):
    """step_N/ (1 bit per weight plus the changed values, no config) becomes a folder from_pretrained loads,
    with the step's exact weights and the base's tokenizer; an output folder holding files is refused."""
    tok = word_tokenizer()
    model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
    run = tmp_path / "run"
    model.save_pretrained(run / "base")
    tok.save_pretrained(run / "base")
    tuned = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned["transformer.h.1.mlp.c_fc.weight"][3, :7] += 0.5
    masks = {n: t != p for (n, t), p in zip(tuned.items(), model.parameters())}
    (run / "step_3").mkdir()
    save_compact(run / "step_3" / "subnet.safetensors", 3, "../base", {n: (t, masks[n]) for n, t in tuned.items()})
    assert export_cli.main(["--step_dir", str(run / "step_3"), "--output_dir", str(tmp_path / "out")]) == 0
    loaded = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    assert all(torch.equal(loaded[n], t) for n, t in tuned.items())
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()
    with pytest.raises(SystemExit) as done:
        export_cli.main(["--step_dir", str(run / "step_3"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and "already holds files" in err[0]


def test_import_reward_refuses_a_spec_without_function():
    with pytest.raises(SubnetscopeError, match="pass --reward module:function"):
        import_reward("module_only:")
