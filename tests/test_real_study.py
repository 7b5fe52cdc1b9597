"""The real-model study's pieces on tiny inputs: the arithmetic task and its exact-match reward, the run
plan, the claims and table writer, and (slow) one tiny group end to end against an independent diff."""
import csv
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from subnetscope.arithmetic import ArithmeticReward, Difficulty, Problem, final_number, make_problems, problem_in
from subnetscope.baselines import sft_records
from subnetscope.errors import SubnetscopeError
from subnetscope.real_study import (RESUME_ONLY, RealStudyConfig, least_busy, run_specs,
                                    visible_gpus)
from subnetscope.real_study_report import claims, write_tables
from subnetscope.report import write_csv, write_json

SHARED = Path(__file__).resolve().parents[2] / "shared"


def test_problems_are_distinct_within_the_difficulty_and_answered_right():
    problems = make_problems(300, seed=5, difficulty=Difficulty(2, 3, 10, 0.5))
    assert len({p.expression for p in problems}) == 300
    for p in problems:
        operands = [int(x) for x in p.expression.replace("*", "+").split("+")]
        assert 2 <= len(operands) <= 3 and all(2 <= x <= 10 for x in operands)
        assert p.answer == eval(p.expression)  # noqa: S307 - the test's independent evaluator
    assert [p.expression for p in make_problems(20, seed=5)] == [p.expression for p in make_problems(20, seed=5)]


def test_worked_answer_shows_the_products_then_ends_at_the_answer():
    assert Problem("3 + 2 * 8").worked_answer == "3 + 2 * 8 = 3 + 16 = 19. The answer is 19."
    assert Problem("4 * 5").worked_answer == "4 * 5 = 20. The answer is 20."
    assert Problem("6 + 7 + 2").worked_answer == "6 + 7 + 2 = 15. The answer is 15."


@pytest.mark.parametrize("text, number", [("The answer is 19.", 19), ("3 + 16 = 19", 19), ("no digits", None),
                                          ("it is 1,234", 1234), ("-5 then 12", 12)])
def test_final_number(text, number):
    assert final_number(text) == number


def test_reward_is_exact_match_and_reads_the_problem_from_a_templated_prompt():
    prompt = Problem("3 + 2 * 8").prompt
    templated = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    reward = ArithmeticReward()
    assert reward([prompt, templated, prompt, "Hello"], ["19", "so 3 + 16 = 19.", "20", "19"]) == [1.0, 1.0, 0.0, None]
    assert reward(prompts=[prompt], completions=["19"], completion_ids=[[1]]) == [1.0]
    assert problem_in("What is 2 + __import__('os')?") is None


def test_rejection_sampling_keeps_only_passing_samples():
    samples = [[(1.0, " 19")], [(0.0, " 7")], [(1.0, "12"), (0.0, "3")]]
    kept = sft_records(["a", "b", "c"], samples, min_reward=1.0)
    assert kept == {"prompt": ["a", "c"], "completion": [" 19", " 12"]}
    with pytest.raises(SubnetscopeError, match="--min_reward"):
        sft_records(["b"], [[(0.0, "7")]], min_reward=1.0)


def test_the_plan_runs_each_algorithm_at_its_usual_and_the_shared_lr():
    cfg = RealStudyConfig(policy="tiny-gpt2", seeds=[0, 1, 2])
    specs = run_specs(cfg, {k: Path(f"{k}.jsonl") for k in ("prompts", "reference", "heldout")})
    by_algo = {}
    for s in specs:
        by_algo.setdefault((s.algo, s.precision), set()).add(s.lr)
    assert by_algo == {("grpo", "mixed"): {1e-6}, ("ppo", "mixed"): {1e-6}, ("dpo", "mixed"): {1e-6},
                       ("sft", "mixed"): {1e-5, 1e-6}, ("rft", "mixed"): {1e-5, 1e-6}, ("grpo", "bf16"): {1e-6}}
    assert len(specs) == 7 * 3 + 1
    rft = next(s for s in specs if s.algo == "rft")
    assert rft.settings["min_reward"] == 1.0 and rft.settings["sft_data"] == "samples"
    sft = next(s for s in specs if s.algo == "sft")
    assert sft.settings["sft_data"] == "completions" and sft.settings["dataset"] == "reference.jsonl"


def _row(algo, lr, seed, changed, precision="mixed"):
    return {"algo": algo, "lr": lr, "seed": seed, "precision": precision, "changed_exact": changed,
            "changed_atol": changed, "changed_relative": changed, "rank_percent_mean": 99.5, "heldout_after": 0.5,
            "heldout_before": 0.25}


def test_claims_state_each_verdict_from_hand_computed_numbers():
    rows = [_row("grpo", 1e-6, 0, 0.10), _row("grpo", 1e-6, 1, 0.20), _row("sft", 1e-5, 0, 0.60),
            _row("sft", 1e-6, 0, 0.20), _row("rft", 1e-6, 0, 0.16),
            {**_row("grpo", 1e-6, 0, 0.004), "precision": "bf16", "rank_percent_mean": 49.6}]  # the contrast
    overlaps = [{"algo": "grpo", "rule": "exact", "jaccard": 0.5, "jaccard_random": 0.1, "o1": 0.6, "o1_random": 0.2},
                {"algo": "sft", "rule": "exact", "jaccard": 0.7, "jaccard_random": 0.3, "o1": 0.8, "o1_random": 0.4},
                {"algo": "sft", "rule": "exact", "jaccard": 0.8, "jaccard_random": 0.3, "o1": 0.8, "o1_random": 0.4}]
    group = {"config": {"shared_lr": 1e-6}, "subnetwork": None, "precision": None}
    text = "\n".join(claims(rows, overlaps, group))
    assert "RL leaves most weights bit-identical: holds: RL 85.0% identical" in text  # 1 - mean(0.1, 0.2)
    assert "each at its usual lr: holds (ratio 4.00" in text  # 0.60 / 0.15
    assert "shared lr (1e-06): does not hold (ratio 1.33" in text  # 0.20 / 0.15
    assert "at lr 1e-06: does not hold (changed exact: RFT 16.00%, RL 15.00%, SFT 20.00%)" in text
    assert "Updates nearly full rank: holds (mean 99.5%" in text
    assert "overlap above chance: holds (1 of 1 RL seed pairs; Jaccard 0.500 vs chance 0.100" in text
    assert "RL's seeds overlap more than SFT's: does not hold (Jaccard RL 0.500, SFT 0.750" in text  # mean(.7, .8)


def test_a_cell_missing_one_of_its_seeds_reads_n_a():
    from subnetscope.real_study_report import main_table

    rows = [{**_row("grpo", 1e-6, 0, 0.1), "identical_in_blocks": 0.8}, _row("grpo", 1e-6, 1, 0.2)]
    assert main_table(rows)[2].startswith("| grpo | 1e-06 | mixed | 2 | 85.00 ± 7.07 | n/a |")  # 90%, 80%


def test_table_writer_builds_one_table_over_the_groups_it_finds(tmp_path):
    folder = tmp_path / "tiny__arithmetic"
    rows = [{**_row("grpo", 1e-6, s, 0.1 + 0.1 * s), "policy": "tiny", "task": "arithmetic", "run": f"grpo_{s}"}
            for s in (0, 1)]
    write_csv(folder / "results.csv", rows)
    write_csv(folder / "overlap.csv", [])
    # 4 blocks of 10 weights beside 60 outside them (embeddings); in the blocks seed 0 changed 10%, seed 1 30%
    layers = [{"run": f"grpo_{s}", "algo": "grpo", "lr": 1e-6, "seed": s, "precision": "mixed", "block": b,
               "relative_depth": b / 3, "numel": 10, "changed_exact": 0.1 + 0.2 * s, "changed_atol": 0.1,
               "changed_relative": 0.1 * (b + 1)} for s in (0, 1) for b in range(4)]
    layers += [{"run": f"grpo_{s}", "algo": "grpo", "lr": 1e-6, "seed": s, "precision": "mixed", "block": "outside",
                "relative_depth": None, "numel": 60, "changed_exact": 0.05, "changed_atol": 0.05,
                "changed_relative": 0.9} for s in (0, 1)]
    write_csv(folder / "layers.csv", layers)
    write_csv(folder / "curves.csv", [{"run": "grpo_0", "algo": "grpo", "lr": 1e-6, "seed": 0, "precision": "mixed",
                                       "step": k, "exact": 0.01 * k} for k in (1, 2, 3)])
    write_json(folder / "group.json", {"config": {"policy": "tiny", "task": "arithmetic", "max_steps": 3,
                                                  "batch_size": 2, "seeds": [0, 1], "shared_lr": 1e-6},
                                       "device": "cpu", "command": "python real_study.py run --policy tiny",
                                       "missing_runs": ["ppo_lr1e-06_s0"]})
    write_json(tmp_path / "missing.json", {"tiny__arithmetic": "not run yet", "tiny__imdb": "no reviews"})
    table = write_tables(tmp_path).read_text()
    # a group recorded as missing and measured since shows its table, not the old reason
    assert "not run yet" not in table and "## tiny__imdb: not measured\n\nno reviews" in table
    assert "## tiny on arithmetic" in table and "`python real_study.py run --policy tiny`" in table
    assert "| grpo | 1e-06 | mixed | 2 | 85.00 ± 7.07 | 80.00 ± 14.14 |" in table  # identical 90%, 80%; 90%, 70%
    assert "RL 85.0% identical, 80.0% in the transformer blocks" in table
    assert "The transformer blocks hold 40.0% of the weights." in table
    assert "Runs missing (not run, or not finished; the note says why): ppo_lr1e-06_s0." in table
    with open(tmp_path / "localization.csv") as f:
        loc = list(csv.DictReader(f))
    profile = [0.1, 0.2, 0.3, 0.4]  # Gini of a uniform ramp: sum |xi - xj| / (2 n^2 mean)
    gini = sum(abs(a - b) for a in profile for b in profile) / (2 * 16 * 0.25)
    assert float(loc[0]["gini"]) == pytest.approx(gini)
    assert (folder / "density_curves.png").stat().st_size > 0 and (folder / "layers_by_depth.png").is_file()


@pytest.mark.slow
def test_a_tiny_group_end_to_end_matches_an_independent_diff(tmp_path):
    policy = SHARED / "models" / "tiny-gpt2"
    if not policy.is_dir():
        pytest.skip("../shared/models/tiny-gpt2 is not beside the checkout")
    from subnetscope.cli.real_study import main

    out, results = tmp_path / "runs", tmp_path / "results"
    assert main(["run", "--policy", str(policy), "--task", "imdb", "--imdb", str(SHARED / "data/imdb/train.jsonl.gz"),
                 "--algos", "grpo", "sft", "--seeds", "0", "1", "--max_steps", "2", "--save_every", "1",
                 "--batch_size", "4", "--group_size", "2", "--max_new_tokens", "6", "--train_prompts", "64",
                 "--heldout_prompts", "8", "--jobs", "0", "--device", "cpu", "--precision", "fp32",
                 "--contrast", "no", "--subnetwork", "yes", "--output_dir", str(out),
                 "--results_dir", str(results)]) == 0
    group = results / "tiny-gpt2__imdb"
    with open(group / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"grpo_lr1e-06_s0", "grpo_lr1e-06_s1", "sft_lr1e-05_s0", "sft_lr1e-05_s1",
                         "sft_lr1e-06_s0", "sft_lr1e-06_s1"}
    for name, row in rows.items():
        run = out / "tiny-gpt2__imdb" / "runs" / name
        base = load_file(str(run / "base" / "model.safetensors"))
        final = load_file(str(run / "final" / "model.safetensors"))
        changed = sum(int((base[k].to(torch.bfloat16).view(torch.int16) != final[k].to(torch.bfloat16).view(
            torch.int16)).sum()) for k in base if k in final and base[k].is_floating_point())
        numel = int(row["numel"])
        assert float(row["changed_exact"]) == pytest.approx(changed / numel, abs=1 / numel), name
    summary = json.loads((group / "group.json").read_text())
    assert summary["missing_runs"] == [] and set(summary["subnetwork"]["identical_fraction"]) == {
        "exact", "atol", "relative"}
    leftovers = [p for p in (out / "tiny-gpt2__imdb" / "runs").glob("*/*/*")
                 if re.fullmatch(r"(step_|checkpoint-)\d+", p.parent.name) and p.name in RESUME_ONLY]
    assert leftovers == []  # a finished run keeps no resume-only state
    assert (results / "table.md").read_text().count("## tiny-gpt2 on imdb") == 1


def test_run_processes_import_this_checkout_from_any_folder(tmp_path):
    """--jobs runs start `python -m subnetscope.real_study` from wherever the study was called; the
    child must import this package even when it is not installed."""
    import subprocess
    import sys

    from subnetscope.real_study import _child_env

    env = {k: v for k, v in _child_env().items() if k != "PYTHONHOME"}
    out = subprocess.run([sys.executable, "-S", "-c", "import subnetscope; print(subnetscope.__file__)"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out).resolve().parent == Path(__file__).resolve().parents[1] / "subnetscope"


def test_run_processes_spread_evenly_over_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    gpus = visible_gpus()
    assert gpus == ["2", "5"]
    busy: list[str | None] = []
    for _ in range(5):  # five runs started one after another: 2, 5, 2, 5, 2
        busy.append(least_busy(gpus, busy))
    assert busy == ["2", "5", "2", "5", "2"]
    busy.remove("2")
    busy.remove("2")  # two runs on GPU 2 finish: the next two go there
    assert least_busy(gpus, busy) == "2" and least_busy(gpus, busy + ["2"]) == "2"
    assert least_busy(gpus, busy + ["2", "2"]) == "5"


def test_localization_compares_two_models_on_one_task_for_each_algorithm():
    from subnetscope.real_study_report import model_pairs

    loc = [{"algo": a, "group": g} for a, g in [("grpo", "smol__arithmetic"), ("grpo", "smol__imdb"),
                                                  ("dpo", "smol__imdb"), ("dpo", "gemma__imdb"),
                                                  ("grpo", "gemma__arithmetic")]]
    assert model_pairs(loc) == [("grpo", "smol__arithmetic", "gemma__arithmetic"), ("dpo", "smol__imdb", "gemma__imdb")]


def test_results_rebuilt_from_summaries_keep_the_overlap_measured_beside_the_checkpoints(tmp_path):
    from subnetscope.real_study import overlap_rows

    summaries = {f"dpo_s{s}": {"run": f"dpo_s{s}", "algo": "dpo", "lr": 1e-6, "seed": s, "precision": "mixed"}
                 for s in (0, 1, 2)}
    kept = [{"algo": "dpo", "lr": 1e-6, "seed_1": 0, "seed_2": 1, "rule": "exact", "jaccard": 0.25},
            {"algo": "dpo", "lr": 1e-6, "seed_1": 0, "seed_2": 2, "rule": "exact", "jaccard": 0.5},
            {"algo": "sft", "lr": 1e-5, "seed_1": 0, "seed_2": 1, "rule": "exact", "jaccard": 0.75}]
    write_csv(tmp_path / "overlap.csv", kept)
    rows = overlap_rows(summaries, tmp_path / "runs", "cpu", kept=tmp_path / "overlap.csv")
    # the dpo pairs measured earlier come back; (1, 2) was never measured; the sft run is not in the summaries
    assert [(r["seed_1"], r["seed_2"], r["jaccard"]) for r in rows] == [(0, 1, 0.25), (0, 2, 0.5)]


def test_the_recorded_command_leaves_the_note_to_its_own_line():
    from subnetscope.cli.real_study import without_note

    assert without_note(["run", "--note", "GPU time ran out", "--jobs", "8", "--note=x y"]) == ["run", "--jobs", "8"]


def test_a_follow_up_run_starts_as_soon_as_its_source_finishes(tmp_path, monkeypatch):
    """The subnetwork rerun goes ahead of the runs still queued, and is queued at once when its source
    finished in an earlier call; a finished follow-up is not run again."""
    from subnetscope import real_study

    order = []

    def fake_run(spec, folder, heldout, device):
        order.append(spec.name)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / real_study.SUMMARY, {"run": spec.name})

    monkeypatch.setattr(real_study, "run_and_measure", fake_run)
    specs = [real_study.RunSpec(n, "grpo", 1e-6, 0, "mixed", {}) for n in ("a", "b", "c")]
    sub = real_study.RunSpec("sub_a", "grpo", 1e-6, 0, "mixed", {})
    cfg = real_study.RealStudyConfig(policy="tiny", task="imdb", jobs=0, device="cpu")
    follow = {"a": sub}.get
    summaries = real_study.run_all(specs, tmp_path, tmp_path / "heldout", cfg, log=lambda _: None, follow_up=follow)
    assert order == ["a", "sub_a", "b", "c"] and set(summaries) == {"a", "b", "c"}
    order.clear()
    (tmp_path / "runs" / "sub_a" / real_study.SUMMARY).unlink()
    (tmp_path / "runs" / "c" / real_study.SUMMARY).unlink()
    real_study.run_all(specs, tmp_path, tmp_path / "heldout", cfg, log=lambda _: None, follow_up=follow)
    assert order == ["sub_a", "c"]  # a resumed study: the source had finished, its follow-up had not: first
    real_study.run_all(specs, tmp_path, tmp_path / "heldout", cfg, log=lambda _: None, follow_up=follow)
    assert order == ["sub_a", "c"]


def test_a_group_rebuilt_before_its_runs_names_each_missing_run_and_the_subnetwork_rerun(tmp_path):
    from subnetscope import real_study

    cfg = real_study.RealStudyConfig(policy="tiny", task="arithmetic", algos=["grpo", "sft"], seeds=[0], train=False,
                                     max_operands=2, max_value=20, train_prompts=8, heldout_prompts=4,
                                     output_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"))
    write_json(tmp_path / "runs" / cfg.group / "heldout_before.json", {"heldout_before": 0.25})
    group = json.loads((real_study.run_group(cfg, log=lambda _: None) / "group.json").read_text())
    assert group["missing_runs"] == ["grpo_lr1e-06_s0", "sft_lr1e-05_s0", "sft_lr1e-06_s0", "grpo_lr1e-06_s0_bf16",
                                     "subnetwork_grpo_lr1e-06_s0"]
    assert group["subnetwork"] is None and group["heldout_before"] == 0.25
    for changes in ({"subnetwork": False}, {"algos": ["sft"]}):  # no rerun asked for, or no GRPO run to repeat
        group = json.loads((real_study.run_group(replace(cfg, **changes), log=lambda _: None) / "group.json")
                           .read_text())
        assert not [name for name in group["missing_runs"] if name.startswith("subnetwork_")]


def test_run_processes_share_the_cores_unless_told(monkeypatch):
    from subnetscope.real_study import threads_per_run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("subnetscope.real_study.usable_cores", lambda: 32)
    assert threads_per_run(16) == {"OMP_NUM_THREADS": "2"} and threads_per_run(40) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_run(16) == {}


def test_a_yaml_config_sets_what_the_same_flags_set(tmp_path):
    """The study's flags come from its config dataclass: a --config file (lists and yes/no switches
    included) gives the config the flags give, and a bad value is refused in one line."""
    from subnetscope.cli.dataclass_args import config_from_args
    from subnetscope.cli.real_study import build_parser

    (tmp_path / "study.yaml").write_text("task: imdb\nalgos: [grpo, rft]\nseeds: [3]\ncontrast: false\n"
                                         "max_operands: 2\nchat_template: true\n")
    parser = build_parser()
    from_file = config_from_args(RealStudyConfig, parser.parse_args(["run", "--config", str(tmp_path / "study.yaml")]))
    from_flags = config_from_args(RealStudyConfig, parser.parse_args(
        ["run", "--task", "imdb", "--algos", "grpo", "rft", "--seeds", "3", "--contrast", "no", "--max_operands", "2",
         "--chat_template", "yes"]))
    expected = RealStudyConfig(task="imdb", algos=["grpo", "rft"], seeds=[3], contrast=False, max_operands=2,
                               chat_template=True)
    assert from_file == from_flags == expected
    assert RealStudyConfig().algos is not RealStudyConfig().algos  # each config its own list
    (tmp_path / "bad.yaml").write_text("algos: [grpo, sgd]\n")
    with pytest.raises(SubnetscopeError, match="sgd"):
        config_from_args(RealStudyConfig, parser.parse_args(["run", "--config", str(tmp_path / "bad.yaml")]))


def test_two_operand_problems_when_asked():
    from subnetscope.real_study import arithmetic_files

    rows = arithmetic_files(RealStudyConfig(max_operands=2, train_prompts=50, heldout_prompts=10))
    counts = {r["prompt"].split("?")[0].count("+") + r["prompt"].split("?")[0].count("*") for r in rows["heldout"]}
    assert counts == {1}  # one operator: two operands
    with pytest.raises(SubnetscopeError, match="max_operands"):
        RealStudyConfig(max_operands=1).validate()


def test_a_failed_source_run_gets_no_follow_up(tmp_path, monkeypatch):
    """With run processes (--jobs >= 1), a full run that failed must not start its subnetwork rerun (whose
    mask would come from a partial run); one that finished does."""
    from subnetscope import real_study

    class FakeProcess:
        def __init__(self, argv, **kwargs):
            self.name = Path(argv[-1]).name.removesuffix(".spec.json")
            self.returncode = 1 if self.name == "a" else 0
            if self.returncode == 0:
                write_json(Path(argv[-1]).parent / self.name / real_study.SUMMARY, {"run": self.name})

        def poll(self):
            return self.returncode

    monkeypatch.setattr(real_study.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(real_study.time, "sleep", lambda s: None)
    asked = []

    def follow(name):
        asked.append(name)
        return real_study.RunSpec(f"sub_{name}", "grpo", 1e-6, 0, "mixed", {}) if name in ("a", "b") else None

    specs = [real_study.RunSpec(n, "grpo", 1e-6, 0, "mixed", {}) for n in ("a", "b")]
    cfg = real_study.RealStudyConfig(policy="tiny", task="imdb", jobs=1, device="cpu")
    summaries = real_study.run_all(specs, tmp_path, tmp_path / "heldout", cfg, log=lambda _: None, follow_up=follow)
    assert "a" not in asked and set(summaries) == {"b"}
    assert (tmp_path / "runs" / "sub_b" / real_study.SUMMARY).is_file()
    assert not (tmp_path / "runs" / "sub_a").exists()


def test_kept_task_data_made_with_other_settings_is_refused(tmp_path):
    from subnetscope.real_study import write_task_files

    cfg = RealStudyConfig(max_operands=3, train_prompts=40, heldout_prompts=8)
    paths = write_task_files(cfg, tmp_path)
    assert json.loads((tmp_path / "data" / "settings.json").read_text())["max_operands"] == 3
    assert write_task_files(cfg, tmp_path) == paths  # the same settings resume
    with pytest.raises(SubnetscopeError, match="max_operands 3 .this call 2."):
        write_task_files(RealStudyConfig(max_operands=2, train_prompts=40, heldout_prompts=8), tmp_path)


def test_a_quoted_yes_or_no_in_yaml_is_read_like_the_flag(tmp_path):
    from subnetscope.cli.dataclass_args import config_from_args
    from subnetscope.cli.real_study import build_parser

    (tmp_path / "s.yaml").write_text('contrast: "no"\nsubnetwork: "yes"\n')
    cfg = config_from_args(RealStudyConfig, build_parser().parse_args(["run", "--config", str(tmp_path / "s.yaml")]))
    assert cfg.contrast is False and cfg.subnetwork is True
    (tmp_path / "bad.yaml").write_text('contrast: "maybe"\n')
    with pytest.raises(SubnetscopeError, match="use yes or no"):
        config_from_args(RealStudyConfig, build_parser().parse_args(["run", "--config", str(tmp_path / "bad.yaml")]))


def test_a_run_out_of_gpu_memory_or_disk_space_is_tried_again_with_fewer_at_a_time(tmp_path, monkeypatch):
    """Session 12: 15 Gemma runs on one GPU, 8 died of CUDA OOM and were lost for the session. Now an OOM
    run is queued again (at most OUT_OF_ROOM_RETRIES times) with as many at a time as were running and did not run
    out; so is one whose checkpoint did not fit on a disk full of its neighbours' (session 14); other failures
    are not, an attempt is judged by its own part of the log, and a run's follow-up waits for the attempt
    that finished."""
    from subnetscope import real_study

    oom, other = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB\n", "ValueError: no\n"
    context_oom = "RuntimeError: CUDA error: out of memory\n"  # a CUDA context or cuBLAS handle on a full GPU
    disk = "SubnetscopeError: no space left on the disk for runs/d/step_200: it needs about 4.1 GB, 2.4 GB free\n"
    plan = {"a": [oom, ""], "b": [other], "c": [oom, context_oom] + [oom] * (real_study.OUT_OF_ROOM_RETRIES - 1),
            "d": [disk, ""], "e": [""], "f": [oom, other]}  # what each attempt writes; "" finishes
    started: list[str] = []
    running: list[int] = []
    alive: set[str] = set()

    class FakeProcess:
        def __init__(self, argv, stdout, **kwargs):
            self.name = Path(argv[-1]).name.removesuffix(".spec.json")
            text = plan[self.name][started.count(self.name)]
            started.append(self.name)
            alive.add(self.name)
            running.append(len(alive))
            stdout.write(text)
            self.returncode = 1 if text else 0
            if not text:
                write_json(Path(argv[-1]).parent / self.name / real_study.SUMMARY, {"run": self.name})

        def poll(self):
            alive.discard(self.name)
            return self.returncode

    monkeypatch.setattr(real_study.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(real_study.time, "sleep", lambda s: None)
    messages = []
    specs = [real_study.RunSpec(n, "grpo", 1e-6, 0, "mixed", {}) for n in ("a", "b", "c", "d", "f")]
    cfg = real_study.RealStudyConfig(policy="tiny", task="imdb", jobs=3, device="cpu")
    summaries = real_study.run_all(specs, tmp_path, tmp_path / "heldout", cfg, log=messages.append,
                                   follow_up=lambda n: real_study.RunSpec("e", "grpo", 1e-6, 0, "mixed", {})
                                   if n == "a" else None)
    assert set(summaries) == {"a", "d"}
    assert {n: started.count(n) for n in plan} == {n: len(texts) for n, texts in plan.items()}
    assert started.index("e") == started.index("a", 1) + 1  # right after the attempt of a that finished
    assert [m for m in messages if "FAILED" in m] == [f"{n}: FAILED, see runs/{n}.log" for n in ("b", "f", "c")]
    # a and c ran out beside 3 (one of them b): 2, then 1 at a time; one at a time from then on
    limits = [(m[0], re.search(r"(\d+) run\(s\) at a time", m).group(1)) for m in messages if "; queued" in m]
    assert limits[:2] == [("a", "2"), ("c", "1")] and {n for _, n in limits[2:]} == {"1"}
    assert "d: out of disk space; queued again" in " ".join(messages) and started.count("d") == 2
    assert running[:3] == [1, 2, 3] and set(running[3:]) == {1}


def test_only_the_error_that_ended_a_run_says_what_it_ran_out_of(tmp_path):
    from subnetscope.real_study import out_of_room

    frames = 'Traceback (most recent call last):\n  File "rl.py", line 564, in train\n    self._save(step)\n'
    logs = {
        "warned": "UserWarning: could not write cache: [Errno 28] No space left on device\n" + frames
                  + "ValueError: shapes (4,) and (5,) differ\n",
        "gpu": "step 10\n" + frames + "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n",
        "context": frames + "RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be asynchronously "
                            "reported at some other API call.\n",
        "disk": frames + "OSError: [Errno 28] No space left on device\n",
        "ours": frames + "subnetscope.errors.SubnetscopeError: no space left on the disk for runs/a/step_200: it "
                         "needs about 4.1 GB, 2.4 GB free\n",
        "chained": frames + "torch.OutOfMemoryError: CUDA out of memory.\n\nDuring handling of the above exception, "
                            "another exception occurred:\n\n" + frames + "KeyError: 'reward'\n",
        "plain": "error: --policy: no such model\n",
    }
    seen = {}
    for name, text in logs.items():
        (tmp_path / name).write_text("an earlier attempt: torch.OutOfMemoryError\n" + text)
        seen[name] = out_of_room(tmp_path / name, len("an earlier attempt: torch.OutOfMemoryError\n"))
    assert seen == {"warned": None, "gpu": "GPU memory", "context": "GPU memory", "disk": "disk space",
                    "ours": "disk space", "chained": None, "plain": None}


def test_on_two_gpus_the_limit_is_what_one_gpu_held_on_each(tmp_path, monkeypatch):
    """6 runs at a time on 2 GPUs (3 each); two of GPU 0's three run out of memory in one round: GPU 0 held one,
    so from then on one run a GPU, 2 at a time (a total cut by 2 would have put 2 on a GPU again)."""
    from subnetscope import real_study

    started: list[tuple[str, str]] = []
    alive: dict[str, str] = {}
    most: list[int] = []

    class FakeProcess:
        def __init__(self, argv, stdout, env, **kwargs):
            self.name = Path(argv[-1]).name.removesuffix(".spec.json")
            gpu = env["CUDA_VISIBLE_DEVICES"]
            first = all(n != self.name for n, _ in started)
            started.append((self.name, gpu))
            alive[self.name] = gpu
            most.append(max(list(alive.values()).count(g) for g in ("0", "1")))
            self.returncode = 1 if first and self.name in ("r0", "r2") else 0
            stdout.write("torch.OutOfMemoryError: CUDA out of memory.\n" if self.returncode else "")
            if not self.returncode:
                write_json(Path(argv[-1]).parent / self.name / real_study.SUMMARY, {"run": self.name})

        def poll(self):
            alive.pop(self.name, None)
            return self.returncode

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(real_study, "_resolved_device", lambda device: "cuda")
    monkeypatch.setattr(real_study.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(real_study.time, "sleep", lambda s: None)
    messages = []
    specs = [real_study.RunSpec(f"r{i}", "grpo", 1e-6, 0, "mixed", {}) for i in range(8)]
    cfg = real_study.RealStudyConfig(policy="tiny", task="imdb", jobs=6, device="cuda")
    summaries = real_study.run_all(specs, tmp_path, tmp_path / "heldout", cfg, log=messages.append)
    assert set(summaries) == {f"r{i}" for i in range(8)}
    assert [gpu for _, gpu in started[:6]] == ["0", "1"] * 3  # r0, r2, r4 on GPU 0
    assert [m.split(":")[0] for m in messages if "out of GPU" in m] == ["r0", "r2"]
    assert "2 run(s) at a time" in [m for m in messages if m.startswith("r2: out of GPU")][0]
    assert most[:6] == [1, 1, 2, 2, 3, 3] and set(most[6:]) == {1}


def test_distinct_problems_counted_as_the_generator_finds_them():
    for difficulty, by_hand in [(Difficulty(max_operands=2, max_value=10), 9 * 9 * 2),
                                (Difficulty(max_operands=3, max_value=4), 3 * 3 * 2 + 3 * 3 * 3 * 4),
                                (Difficulty(max_operands=2, max_value=6, product_share=0.0), 5 * 5)]:
        assert difficulty.distinct_problems() == by_hand
        assert len(make_problems(by_hand + 50, seed=0, difficulty=difficulty)) == by_hand  # every one, no more


def test_too_few_distinct_problems_are_refused_before_any_work(tmp_path, capsys):
    """Session 12: --max_operands 2 at the default --max_value 10 has 162 problems; the held-out 200 took them
    all and the training set came out empty, which only a GPU run would have shown."""
    from subnetscope.cli.real_study import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "--policy", "tiny-gpt2", "--task", "arithmetic", "--max_operands", "2",
              "--output_dir", str(tmp_path / "study"), "--results_dir", str(tmp_path / "results")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "only 162 distinct problems, fewer than the 2200" in err[0]
    assert not (tmp_path / "study").exists() and not (tmp_path / "results").exists()
    RealStudyConfig(max_operands=2, max_value=35).validate()  # 2 x 34^2 = 2312 problems: enough


def test_an_arithmetic_group_of_another_difficulty_gets_its_own_folder_and_heading():
    from subnetscope.real_study_report import task_title

    default = RealStudyConfig(policy="/m/smollm2-135m-instruct", task="arithmetic")
    easier = RealStudyConfig(policy="/m/smollm2-135m-instruct", task="arithmetic", max_operands=2, max_value=20)
    assert default.group == "smollm2-135m-instruct__arithmetic"  # the committed group keeps its folder
    assert easier.group == "smollm2-135m-instruct__arithmetic-2ops-max20"
    assert RealStudyConfig(policy="p", task="imdb", max_value=20).group == "p__imdb"
    assert task_title({"task": "arithmetic", "max_operands": 2, "max_value": 20}) == \
        "arithmetic (2 operands, each 2 to 20)"
    assert task_title({"task": "arithmetic", "max_value": 10}) == "arithmetic (2-3 operands, each 2 to 10)"
    assert task_title({"task": "imdb", "max_value": 10}) == "imdb"


def test_a_refusal_while_making_the_data_leaves_nothing_to_refuse_the_corrected_call(tmp_path, monkeypatch):
    """settings.json was written before the rows: after 'only N distinct problems drawn', the call with a lower
    --train_prompts was refused for changing the kept data's settings, though no data had been kept."""
    import subnetscope.real_study as rs

    with pytest.raises(SubnetscopeError, match="--train_prompts"):
        RealStudyConfig(train_prompts=0).validate()  # an empty training set
    monkeypatch.setattr(rs, "make_problems", lambda n, seed, difficulty: [])
    with pytest.raises(SubnetscopeError, match="distinct problems drawn"):
        rs.write_task_files(RealStudyConfig(train_prompts=40, heldout_prompts=8), tmp_path)
    assert not (tmp_path / "data" / "settings.json").exists()
    monkeypatch.undo()
    paths = rs.write_task_files(RealStudyConfig(train_prompts=20, heldout_prompts=8), tmp_path)
    assert len(paths["prompts"].read_text().splitlines()) == 20
