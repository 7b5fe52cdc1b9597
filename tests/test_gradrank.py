"""Gradient rank: spectra from Gram matrices against direct SVDs of the stacked gradients."""
import json

import pytest
import torch

from subnetscope.cli import gradrank as gradrank_cli
from subnetscope.cli.gradrank import main
from subnetscope.errors import SubnetscopeError
from subnetscope.gradrank import gradient_spectra, spectrum_from_gram


def no_work(*args, **kwargs):
    raise AssertionError("work started before the input was checked")


def test_gram_spectrum_matches_the_svd_of_the_stack():
    torch.manual_seed(0)
    basis = torch.randn(3, 200)
    stack = torch.randn(10, 3) @ basis  # 10 gradients in a 3-dimensional span
    s = spectrum_from_gram("m", stack.double() @ stack.double().T)
    torch.testing.assert_close(torch.tensor(s.singular_values[:3], dtype=torch.float64),
                               torch.linalg.svdvals(stack.double())[:3], rtol=1e-6, atol=1e-9)
    assert s.numerical_rank == 3 and s.effective_rank <= 3 and s.k == 10


def test_gradient_spectra_of_planted_low_rank_gradients():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False), torch.nn.Linear(4, 5, bias=False))
    first = torch.randn(2, 4, 6)   # gradients of layer 0 live in a 2-dim span
    second = torch.randn(4, 5, 4)  # those of layer 1 in a 4-dim span
    coef1, coef2 = torch.randn(8, 2), torch.randn(8, 4)

    def loss(i):
        a = torch.einsum("r,rij->ij", coef1[i], first)
        b = torch.einsum("r,rij->ij", coef2[i], second)
        return (model[0].weight * a).sum() + (model[1].weight * b).sum()

    total, per_matrix = gradient_spectra(model, loss, k=8)
    ranks = {s.name: s.numerical_rank for s in per_matrix}
    assert ranks == {"0.weight": 2, "1.weight": 4}
    assert total.numerical_rank == 6
    stack = torch.cat([torch.einsum("kr,rij->kij", coef1, first).reshape(8, -1),
                       torch.einsum("kr,rij->kij", coef2, second).reshape(8, -1)], 1)
    torch.testing.assert_close(torch.tensor(total.singular_values[:6], dtype=torch.float64),
                               torch.linalg.svdvals(stack.double())[:6], rtol=1e-5, atol=1e-8)


def test_cli_compares_rl_and_sft(tmp_path, capsys):
    main(["--reward", "easy", "--dataset", "easy", "--k", "4", "--batch_size", "8", "--max_new_tokens", "6",
          "--device", "cpu", "--output_dir", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tasks"]["rl"]["global_numerical_rank"] == 4  # fresh rollouts: independent gradients
    assert summary["tasks"]["sft"]["global_numerical_rank"] == 4  # 32 distinct prompts in 4 batches of 8
    assert summary["sft_distinct_prompts"] == 32
    assert (tmp_path / "spectrum.png").exists() and (tmp_path / "gradient_rank.csv").exists()


@pytest.mark.parametrize("dataset, distinct", [("builtin", 40), ("easy", 32)])
def test_k_beyond_the_data_is_refused_before_any_work(tmp_path, capsys, monkeypatch, dataset, distinct):
    """Before: 40 built-in prompts capped the SFT rank at 40 / batch_size whatever --k asked for."""
    monkeypatch.setattr(gradrank_cli, "build_env", no_work)
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", dataset, "--k", "6", "--batch_size", "8", "--device", "cpu",
              "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"--dataset {dataset} has {distinct} distinct" in lines[0] and "needs 48" in lines[0]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_file_of_distinct_texts_reaches_k(tmp_path):
    """SFT batches from a local file: 6 batches of 4 need 24 distinct texts (in the tiny model's words)."""
    texts = tmp_path / "texts.jsonl"
    lines = [json.dumps({"text": f"Sample {i:02d}: {word}"}) for word in ("good", "bad") for i in range(22)]
    texts.write_text("\n".join(lines) + "\n")
    main(["--reward", "easy", "--dataset", str(texts), "--k", "6", "--batch_size", "4", "--max_new_tokens", "4",
          "--device", "cpu", "--output_dir", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sft_distinct_prompts"] == 24  # 44 texts, 16 held out for evaluation, the first 24 used
    assert summary["tasks"]["sft"]["global_numerical_rank"] == 6


def test_sft_prompts_are_distinct_and_counted():
    assert gradrank_cli.distinct_sft_prompts(["a", "b", "a", "c", "d"], "x", 2, 2) == ["a", "b", "c", "d"]
    with pytest.raises(SubnetscopeError, match="has 4 distinct training prompts.*needs 6"):
        gradrank_cli.distinct_sft_prompts(["a", "b", "a", "c", "d"], "x", 3, 2)
