"""RunDir against hand-built run folders: which step is the newest complete one, atomic writes, cleanup."""
import json

import pytest
import torch

from subnetscope.errors import SubnetscopeError
from subnetscope.rundir import FINAL_DIR, STEP_FILES, TRL_PREFIX, RunDir

STATE = "trainer_state.pt"


def make_step(root, name, files):
    folder = root / name
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_bytes(b"x")
    return folder


def test_latest_is_the_highest_complete_step_in_either_layout(tmp_path):
    complete = ("subnet.safetensors", *STEP_FILES)
    make_step(tmp_path, "step_2", complete)
    newest = make_step(tmp_path, "checkpoint-10", ("model.safetensors", *STEP_FILES))
    make_step(tmp_path, "step_9", complete)
    point = RunDir(tmp_path).latest()
    assert point.folder == newest and point.step == 10 and point.skipped == [] and point.notes() == []


def test_incomplete_newer_steps_are_skipped_and_named(tmp_path):
    make_step(tmp_path, "step_3", ("subnet.safetensors", *STEP_FILES))
    no_weights = make_step(tmp_path, "step_5", STEP_FILES)
    no_state = make_step(tmp_path, "step_7", ("subnet.safetensors", STEP_FILES[0]))
    point = RunDir(tmp_path).latest()
    assert point.folder == tmp_path / "step_3" and point.skipped == [no_weights, no_state]
    (note,) = point.notes()
    assert "step_5, step_7 incomplete" in note and "back to step_3" in note


def test_latest_with_a_state_file_alone(tmp_path):
    """Pruning and sparse fine-tuning: a step is complete once its trainer state is there."""
    run = RunDir(tmp_path, TRL_PREFIX)
    make_step(tmp_path, "checkpoint-4", ("trainable.safetensors", STATE))
    make_step(tmp_path, "checkpoint-8", ("trainable.safetensors",))
    assert run.latest(required=(STATE,), one_of=()).folder == tmp_path / "checkpoint-4"


def test_an_empty_or_missing_folder_has_no_steps(tmp_path):
    for path in (tmp_path / "absent", tmp_path):
        run = RunDir(path)
        point = run.latest()
        assert run.steps() == [] and point.folder is None and point.step == 0 and not run.holds_run()
    assert RunDir(tmp_path).metrics() == []


@pytest.mark.parametrize("prefix", ["step_", TRL_PREFIX])
@pytest.mark.parametrize("need", [None, 1024])
def test_save_step_names_the_folder_by_layout(tmp_path, prefix, need):
    run = RunDir(tmp_path, prefix)
    folder = run.save_step(6, lambda tmp: (tmp / STATE).write_text("s"), need)
    assert folder == tmp_path / f"{prefix}6" and (folder / STATE).read_text() == "s"
    assert [c.step for c in run.steps()] == [6] and run.holds_run()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


@pytest.mark.parametrize("need", [None, 1024])
def test_a_failed_save_leaves_no_partial_folder_and_keeps_the_old_one(tmp_path, need):
    run = RunDir(tmp_path)
    run.save_step(3, lambda tmp: (tmp / STATE).write_text("old"))

    def fails(tmp):
        (tmp / STATE).write_text("half")
        raise RuntimeError("killed mid-write")

    for step in (3, 4):
        with pytest.raises(RuntimeError):
            run.save_step(step, fails, need)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3"]
    assert (tmp_path / "step_3" / STATE).read_text() == "old"


def test_finalize_and_final_is_written(tmp_path):
    run = RunDir(tmp_path)
    assert not run.final_is_written()
    (tmp_path / FINAL_DIR).mkdir()
    assert not run.final_is_written()  # a folder without weights is no final model
    run.finalize(lambda tmp: (tmp / "model.safetensors").write_bytes(b"w"))
    assert run.final_is_written() and (tmp_path / FINAL_DIR / "model.safetensors").read_bytes() == b"w"


def test_drop_old_steps_keeps_the_newest(tmp_path):
    names = ["step_1", "step_2", "step_10", "step_20"]
    for name in names:
        make_step(tmp_path, name, (STATE,))
    dropped = RunDir(tmp_path).drop_old_steps(2)
    assert dropped == [tmp_path / n for n in names[:2]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_clean_stale_temps_removes_only_what_killed_writes_left(tmp_path):
    stale = [".step_3.ab12cd", ".checkpoint-4.old", ".base.x1", ".run_config.json.42.tmp"]
    for name in stale[:3]:
        (tmp_path / name).mkdir()
    (tmp_path / stale[3]).write_text("{")
    kept = [".keep", "step_3", "notes.txt"]
    (tmp_path / kept[0]).write_text("mine")
    (tmp_path / kept[1]).mkdir()
    (tmp_path / kept[2]).write_text("n")
    assert RunDir(tmp_path).clean_stale_temps() == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_metrics_reads_the_records(tmp_path):
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    (tmp_path / "subnet_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert RunDir(tmp_path).metrics("subnet_metrics.jsonl") == records


def test_check_resumable_refuses_another_models_parameters(tmp_path):
    model = torch.nn.Linear(3, 2)
    run = RunDir(tmp_path)
    saved = {"settings": {"policy": "tiny"}, "parameters": {n: list(p.shape) for n, p in model.named_parameters()}}
    run.check_resumable(model, saved)
    with pytest.raises(SubnetscopeError, match="trained from tiny, whose parameters differ"):
        run.check_resumable(torch.nn.Linear(4, 2), saved)
