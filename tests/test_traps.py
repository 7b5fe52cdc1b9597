"""Issue 18's traps made explicit: generate leaves the shared tokenizer alone, importing plots leaves the
user's matplotlib backend alone, derived seeds are one-to-one, and small datasets say what they evaluate on."""
import importlib
import json

import matplotlib
import torch

from subnetscope import plots
from subnetscope.data import BUILTIN_PROMPTS
from subnetscope.models import tiny_model, word_tokenizer
from subnetscope.sampling import generate
from subnetscope.seeds import EVAL_SAMPLING_STEP, SHORT_STRIDE, STEP_STRIDE, stream_seed


def test_generate_leaves_the_tokenizers_padding_side_and_pads_prompts_left():
    """Before: generate set padding_side = "left" on the tokenizer it was given, which the testbed then
    trained its reward classifier with and saved; now the caller's side stays and the rollout is the same."""
    tok = word_tokenizer()
    model = tiny_model("gpt2", vocab_size=len(tok)).eval()
    prompts = ["the movie was", "a good film with great actors and a story"]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert lengths[0] < lengths[1]
    rollouts = {}
    for side in ("right", "left"):
        tok.padding_side = side
        rollouts[side] = generate(model, tok, prompts, torch.arange(2), seed=3, step=1, max_new_tokens=5)
        assert tok.padding_side == side
    right, left = rollouts["right"], rollouts["left"]
    assert torch.equal(right.prompt_ids, left.prompt_ids) and torch.equal(right.completion_ids, left.completion_ids)
    assert right.texts == left.texts
    width = lengths[1]  # the shorter prompt's pads come first, so every completion starts at the same column
    assert right.prompt_mask.tolist() == [[0] * (width - lengths[0]) + [1] * lengths[0], [1] * width]


def test_importing_plots_keeps_the_users_backend_and_figures_still_save(tmp_path):
    """Before: `import subnetscope.plots` called matplotlib.use("Agg"), replacing a backend the user chose."""
    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")
        importlib.reload(plots)  # the module's import-time code runs again under the user's choice
        assert matplotlib.get_backend() == "svg"
        path = plots.comparative_series(["a", "b"], [[1, 2, 3], [1, 2]], [[0.1, 0.2, 0.4], [0.3, None]], "y", "t",
                                        tmp_path / "series.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a PNG, drawn by Agg whatever the backend
        assert matplotlib.get_backend() == "svg"  # drawing did not switch it either
    finally:
        matplotlib.use(before)


def test_derived_seeds_are_one_to_one_and_keep_their_values():
    """Each (seed, counter) below the stride gets its own stream; the values are those earlier runs used."""
    seeds = range(4)
    streams = {stream_seed(s, c, SHORT_STRIDE) for s in seeds for c in range(SHORT_STRIDE)}
    assert len(streams) == len(seeds) * SHORT_STRIDE
    assert stream_seed(1, 10, SHORT_STRIDE) == 1 * 7919 + 10 and stream_seed(2, 5, STEP_STRIDE) == 2 * 1_000_003 + 5
    assert stream_seed(0, STEP_STRIDE, STEP_STRIDE) == stream_seed(1, 0, STEP_STRIDE)  # why counters stay below
    assert EVAL_SAMPLING_STEP > STEP_STRIDE  # evaluation's sampling step is beyond any training step


def prompts_file(tmp_path, n: int):
    """n distinct prompts in the tiny models' words (the built-in ones)."""
    path = tmp_path / f"prompts{n}.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in BUILTIN_PROMPTS[:n]))
    return str(path)


def trainer_on(tmp_path, n: int):
    from subnetscope.grpo import GRPOConfig, GRPOTrainer

    return GRPOTrainer(GRPOConfig(policy="tiny-gpt2", reward="easy", dataset=prompts_file(tmp_path, n), device="cpu",
                                  precision="fp32", batch_size=2, group_size=2, max_new_tokens=4, max_steps=1,
                                  no_tqdm=True, output_dir=str(tmp_path / "run")))


def test_a_dataset_holds_out_its_last_16_prompts_for_evaluation(tmp_path):
    trainer = trainer_on(tmp_path, 20)
    assert len(trainer.prompts) == 4 and len(trainer.eval_prompts) == 16
    assert len(set(trainer.prompts + trainer.eval_prompts)) == 20  # disjoint: no prompt is both


def test_a_dataset_of_16_prompts_or_fewer_says_it_evaluates_on_its_training_prompts(tmp_path, capsys):
    """Before: 10 prompts trained and evaluated on the same 10, silently."""
    trainer = trainer_on(tmp_path, 10)
    assert trainer.eval_prompts == trainer.prompts  # still usable: nothing left to hold out
    err = capsys.readouterr().err
    assert "warning:" in err and "has 10 prompts" in err and "evaluation" in err
