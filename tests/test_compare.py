"""compare_architectures.py: runs per model and seed, the localization study, seed-to-seed overlap."""
import csv
import json

from subnetscope.cli.compare import main


def test_comparison_end_to_end(tmp_path, capsys):
    args = ["--algo", "grpo", "--max_steps", "2", "--save_every", "2", "--batch_size", "4", "--max_new_tokens", "6",
            "--reward", "easy", "--dataset", "easy", "--device", "cpu", "--seeds", "0", "1",
            "--runs_dir", str(tmp_path / "runs"), "--output_dir", str(tmp_path / "cmp")]
    main(args)
    out = tmp_path / "cmp"
    with open(out / "seed_overlap.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["model"] for r in rows} == {"tiny-gpt2", "tiny-gemma3n"} and len(rows) == 2 * 3
    for r in rows:  # the overlap and its baseline come from the same two runs
        assert 0 <= float(r["o1"]) <= 1 and float(r["o1_random"]) == float(r["density_2"])
    assert (out / "tiny-gemma3n" / "shells.csv").exists() and (out / "localization_stats.csv").exists()
    json.loads((out / "comparison.json").read_text())
    capsys.readouterr()
    main(args)  # finished runs are reused, not retrained
    assert capsys.readouterr().out.count("finished before, reused") == 4
