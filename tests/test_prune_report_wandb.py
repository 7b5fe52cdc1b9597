"""prune_report.py reads main_prune.py runs from Weights & Biases: an offline run's .wandb file
(a real one, written by wandb in a pruning run, against the run's metrics.jsonl; and hand-framed
ones for block-spanning records, a cut-off end and a resumed run), or a run id, refused in one
line when the service cannot be reached."""
import csv
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from subnetscope.cli import prune_report
from subnetscope.wandb_runs import BLOCK, offline_runs, read_run_file

from .conftest import SHAKESPEARE, TINY_GPT2_DIR

ROOT = Path(__file__).resolve().parents[1]


def frame(payloads: list[bytes]) -> bytes:
    """The LevelDB log framing wandb's run files use (its old datastore's writer, re-written here)."""
    out = bytearray(struct.pack("<4sHB", b":W&B", 0xBEE1, 0))
    for payload in payloads:
        first = True
        while True:
            room = BLOCK - len(out) % BLOCK
            if room < 7:
                out += b"\0" * room
                continue
            chunk, payload = payload[:room - 7], payload[room - 7:]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            out += struct.pack("<IHB", zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, len(chunk), kind)
            out += chunk
            first = False
            if not payload:
                break
    return bytes(out)


def run_record(run_id: str, config: dict) -> bytes:
    from wandb.proto import wandb_internal_pb2 as pb

    record = pb.Record()
    record.run.run_id, record.run.display_name = run_id, f"name-{run_id}"
    for key, value in config.items():
        item = record.run.config.update.add()
        item.key, item.value_json = key, json.dumps(value)
    return record.SerializeToString()


def history_record(step: int, values: dict) -> bytes:
    from wandb.proto import wandb_internal_pb2 as pb

    record = pb.Record()
    for key, value in {**values, "_step": step, "_runtime": 1.5}.items():
        item = record.history.item.add()
        item.nested_key.append(key)
        item.value_json = json.dumps(value)
    return record.SerializeToString()


def test_records_spanning_blocks_and_a_cut_off_end(tmp_path):
    big = {f"layer_sparsity/h.{i}.weight": i / 1000 for i in range(2000)}  # ~70 KB: FIRST, MIDDLE, LAST
    data = frame([run_record("r1", {"target_sparsity": 0.5, "_wandb": {}}), history_record(1, {"a": 1.0}),
                  history_record(2, big), history_record(3, {"a": 3.0})])
    assert len(data) > 2 * BLOCK
    file = tmp_path / "run-r1.wandb"
    file.write_bytes(data[:-5])  # the last record cut short by a kill
    run = read_run_file(file)
    assert run["id"] == "r1" and run["name"] == "name-r1" and run["config"] == {"target_sparsity": 0.5}
    assert [r["step"] for r in run["records"]] == [1, 2]
    assert run["records"][1] == {"step": 2, **big} and run["records"][0] == {"step": 1, "a": 1.0}


def test_a_resumed_run_merges_its_files_later_steps_winning(tmp_path):
    first = tmp_path / "wandb" / "offline-run-20250101_000000-r1"
    second = tmp_path / "wandb" / "offline-run-20250102_000000-r1"
    for folder in (first, second):
        folder.mkdir(parents=True)
    (first / "run-r1.wandb").write_bytes(frame([run_record("r1", {"lr": 1}), history_record(1, {"a": 1}),
                                                history_record(2, {"a": 2})]))
    (second / "run-r1.wandb").write_bytes(frame([run_record("r1", {"lr": 1}), history_record(2, {"a": 20}),
                                                 history_record(3, {"a": 30})]))
    (runs,) = offline_runs(tmp_path)
    assert [(r["step"], r["a"]) for r in runs["records"]] == [(1, 1), (2, 20), (3, 30)]


def refused(capsys, argv, *needles) -> str:
    with pytest.raises(SystemExit) as exc:
        prune_report.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def test_a_run_id_fails_fast_when_the_service_is_out_of_reach(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    refused(capsys, ["--wandb_run", "me/proj/abc123", "--output_dir", tmp_path / "out"],
            "--wandb_run me/proj/abc123", "cannot reach the W&B service at http://127.0.0.1:9")
    assert time.monotonic() - start < 10 and not (tmp_path / "out").exists()


def test_bad_wandb_inputs_are_one_line(tmp_path, capsys):
    refused(capsys, ["--output_dir", tmp_path / "out"], "--results_dir", "--wandb_run")
    refused(capsys, ["--wandb_run", tmp_path / "missing", "--output_dir", tmp_path / "out"],
            f"--wandb_run {tmp_path / 'missing'}: no such file or folder")
    (tmp_path / "empty").mkdir()
    refused(capsys, ["--wandb_run", tmp_path / "empty", "--output_dir", tmp_path / "out"], "no run-<id>.wandb file")
    (tmp_path / "run-x.wandb").write_bytes(b"not a run")
    refused(capsys, ["--wandb_run", tmp_path / "run-x.wandb", "--output_dir", tmp_path / "out"], "no :W&B header")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_offline_wandb_pruning_run_gives_the_tables_of_its_metrics_jsonl(tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text(SHAKESPEARE.read_text()[:6000])
    run = tmp_path / "runs" / "half"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    made = subprocess.run(
        [sys.executable, str(ROOT / "main_prune.py"), "--data", str(text), "--tokenizer", str(TINY_GPT2_DIR),
         "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16", "--batch_size", "4",
         "--epochs", "1", "--prune_applications", "4", "--log_every", "3", "--eval_every", "6",
         "--no-rank_metrics", "--device", "cpu", "--no_tqdm", "--wandb", "subnetscope-test", "--output_dir", str(run)],
        capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    assert made.returncode == 0, made.stderr
    (offline,) = (run / "wandb").glob("offline-run-*")
    logged = offline_runs(offline)[0]["records"]
    jsonl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == len(jsonl) and len(jsonl) > 5
    for mine, theirs in zip(jsonl, logged):  # W&B leaves out the None values
        assert theirs == pytest.approx({k: v for k, v in mine.items() if v is not None})
    tables = {}
    for name, flags in (("folder", ["--results_dir", run]), ("wandb", ["--wandb_run", offline])):
        prune_report.main([str(a) for a in [*flags, "--output_dir", tmp_path / name, "--no-plot"]])
        with open(tmp_path / name / "summary.csv") as fh:
            (tables[name],) = list(csv.DictReader(fh))
    assert tables["wandb"].pop("run") == "half" and tables["folder"].pop("run") == "half"
    assert tables["wandb"] == tables["folder"]
    assert float(tables["folder"]["final_sparsity"]) == pytest.approx(0.5, abs=1e-3)
