"""Gradient rank: spectra from Gram matrices against direct SVDs of the stacked gradients."""
import json

import torch

from subnetscope.cli.gradrank import main
from subnetscope.gradrank import gradient_spectra, spectrum_from_gram


def test_gram_spectrum_matches_the_svd_of_the_stack():
    torch.manual_seed(0)
    basis = torch.randn(3, 200)
    stack = torch.randn(10, 3) @ basis  # 10 gradients in a 3-dimensional span
    s = spectrum_from_gram("m", stack.double() @ stack.double().T)
    torch.testing.assert_close(torch.tensor(s.singular_values[:3], dtype=torch.float64), torch.linalg.svdvals(stack.double())[:3],
                               rtol=1e-6, atol=1e-9)
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
    torch.testing.assert_close(torch.tensor(total.singular_values[:6], dtype=torch.float64), torch.linalg.svdvals(stack.double())[:6],
                               rtol=1e-5, atol=1e-8)


def test_cli_compares_rl_and_sft(tmp_path, capsys):
    main(["--reward", "easy", "--dataset", "easy", "--k", "6", "--batch_size", "8", "--max_new_tokens", "6",
          "--device", "cpu", "--output_dir", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tasks"]["rl"]["global_numerical_rank"] == 6  # fresh rollouts: independent gradients
    assert summary["tasks"]["sft"]["global_numerical_rank"] == 4  # 32 prompts, 8 a batch: batches 5, 6 repeat 1, 2
    assert (tmp_path / "spectrum.png").exists() and (tmp_path / "gradient_rank.csv").exists()
