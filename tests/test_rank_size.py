"""Experiment 1C: the three rank definitions in the analysis and rank_vs_size.py across model sizes, on updates
planted with known singular values."""
import csv
import json

import pytest
import torch

from subnetscope.cli.analyze import main as analyze_main
from subnetscope.cli.rank_size import main

from .conftest import save_state

SIGMA = (10.0, 1.0, 0.05, 0.001)  # numerical rank 4; the plan's σ > 0.01·σ₁ = 0.1 keeps 2; 99% energy: 1


def planted_delta(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(SIGMA), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(SIGMA), generator=gen, dtype=torch.float64))
    return ((u * torch.tensor(SIGMA, dtype=torch.float64)) @ v.T).float()


def gpt2_run(root, layers: int, width: int) -> int:
    """θ0 = zeros for the block matrices (so Δ is stored exactly), a planted Δ in each; returns the parameters."""
    shapes = {"transformer.wte.weight": (50, width), "transformer.ln_f.weight": (width,)}
    for i in range(layers):
        shapes.update({f"transformer.h.{i}.attn.c_attn.weight": (width, 3 * width),
                       f"transformer.h.{i}.attn.c_proj.weight": (width, width),
                       f"transformer.h.{i}.mlp.c_fc.weight": (width, 4 * width),
                       f"transformer.h.{i}.mlp.c_proj.weight": (4 * width, width),
                       f"transformer.h.{i}.ln_1.weight": (width,)})
    theta0 = {n: torch.zeros(s) for n, s in shapes.items()}
    tuned = {n: (planted_delta(*s, seed=k) if len(s) == 2 and ".h." in n else w.clone())
             for k, (n, s, w) in enumerate((n, s, theta0[n]) for n, s in shapes.items())}
    tuned["transformer.wte.weight"][3] += 1.0  # a rank-one embedding update: listed, not in the block means
    save_state(root / "base", theta0)
    save_state(root / "step_5", tuned)
    return sum(w.numel() for w in theta0.values())


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_rank_vs_size_reports_three_definitions_per_model(tmp_path):
    small = gpt2_run(tmp_path / "small", layers=2, width=16)
    large = gpt2_run(tmp_path / "large", layers=3, width=32)
    out = tmp_path / "out"
    main(["--ckpt_dirs", str(tmp_path / "small"), str(tmp_path / "large"), "--output_dir", str(out),
          "--device", "cpu", "--no_tqdm"])
    rows = {r["model"]: r for r in read_csv(out / "rank_vs_size.csv")}
    for label, params, width, layers in (("small", small, 16, 2), ("large", large, 32, 3)):
        r = rows[label]
        assert int(r["parameters"]) == params and int(r["matrices"]) == 4 * layers and r["step"] == "5"
        # every block matrix has full rank = width (its smaller side), ranks 4 / 1 / 2
        assert float(r["numerical_mean_percent"]) == pytest.approx(100 * 4 / width)
        assert float(r["energy99_mean_percent"]) == pytest.approx(100 * 1 / width)
        assert float(r["plan_mean_percent"]) == pytest.approx(100 * 2 / width)
    per_matrix = {(r["model"], r["name"]): r for r in read_csv(out / "rank_per_matrix.csv")}
    embedding = per_matrix[("large", "transformer.wte.weight")]
    assert (int(embedding["rank_numerical"]), int(embedding["rank_plan"]), embedding["block"]) == (1, 1, "")
    summary = json.loads((out / "summary.json").read_text())
    assert "0.01 · σ_1" in summary["definitions"]["plan"]
    assert (out / "rank_vs_size.png").stat().st_size > 0


def test_analysis_per_tensor_and_summary_carry_the_plan_rank(tmp_path):
    gpt2_run(tmp_path / "run", layers=1, width=16)
    out = tmp_path / "out"
    analyze_main(["--base", str(tmp_path / "run" / "base"), "--tuned", str(tmp_path / "run" / "step_5"), "--rank",
                  "--output_dir", str(out), "--device", "cpu", "--no_tqdm"])
    row = {r["name"]: r for r in read_csv(out / "per_tensor.csv")}["transformer.h.0.mlp.c_fc.weight"]
    assert (int(row["rank"]), int(row["rank_energy99"]), int(row["rank_plan"]), int(row["full_rank"])) == (4, 1, 2, 16)
    assert float(row["rank_plan_percent"]) == pytest.approx(12.5)
    ranks = json.loads((out / "summary.json").read_text())["pair"]["update_rank"]
    assert ranks["definitions"]["plan"]["max_percent"] == pytest.approx(100 * 2 / 16)
    assert ranks["mean_percent"] == ranks["definitions"]["numerical"]["mean_percent"]


@pytest.mark.parametrize("flags,needle", [(["--labels", "a"], "--labels"), (["--view_dtype", "int8"], "--view_dtype"),
                                          (["--bases", "x", "y", "z"], "--bases")])
def test_rank_vs_size_bad_input(tmp_path, capsys, flags, needle):
    gpt2_run(tmp_path / "a", layers=1, width=8)
    gpt2_run(tmp_path / "b", layers=1, width=8)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["--ckpt_dirs", str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir", str(out), *flags])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err and not out.exists()
