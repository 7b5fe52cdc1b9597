"""SubnetTrackerCallback under FSDP2: two CPU processes (torchrun, gloo) train a tiny GPT-2 whose blocks and
root are `fully_shard`ed, driving the callback's hooks as a Trainer does. Each process tracks its shard and
the per-tensor counts are summed across processes; they must equal an independent numpy diff of the whole
θ0 (taken before sharding) against the whole weights after each step (gathered with `full_tensor()`), on both
processes and with offload=True. Also: a bf16 view (counts of the rounding, fp32 counts as changed_master,
gathered compact checkpoints), the tracker's saved state gathered whole, a resume from it (θ0 and state
sliced back to the shards) that continues exactly, and the one-line refusals (FSDP1, a replicated DTensor,
a partly sharded model, reference=)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from subnetscope.callback import MASTER_BASE_FILE, TRACKER_FILE, SubnetTrackerCallback
from subnetscope.changes import RULES
from subnetscope.errors import SubnetscopeError
from subnetscope.models import tiny_model, word_tokenizer
from subnetscope.tracker import StepCounts

from .test_callback import check_view_run, fake_run, numpy_counts

STEPS = 3
RESUME_AT = 2

SCRIPT = '''
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, distribute_tensor

from subnetscope.callback import SubnetTrackerCallback
from subnetscope.errors import SubnetscopeError
from subnetscope.models import tiny_model, word_tokenizer

out, steps, resume_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo")
rank = dist.get_rank()
writer = rank == 0
tok = word_tokenizer()
model = tiny_model("gpt2", seed=0, vocab_size=len(tok))
if writer:
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, str(out / "theta0.safetensors"))
for block in model.transformer.h:
    fully_shard(block)
fully_shard(model)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)


def run(name, step=0):
    return SimpleNamespace(output_dir=str(out / name)), SimpleNamespace(global_step=step, max_steps=steps,
                                                                        is_world_process_zero=writer)


refusals = {}
try:
    SubnetTrackerCallback(reference=model).on_train_begin(*run("refused"), None, model=model, processing_class=tok)
except SubnetscopeError as e:
    refusals["reference"] = str(e)
partly = tiny_model("gpt2", seed=0, vocab_size=len(tok))
fully_shard(partly.transformer.h[0])
try:
    SubnetTrackerCallback().on_train_begin(*run("refused"), None, model=partly)
except SubnetscopeError as e:
    refusals["partly"] = str(e)
replicated = torch.nn.Linear(4, 4)
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for name, p in list(replicated.named_parameters()):
    setattr(replicated, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])))
try:
    SubnetTrackerCallback().on_train_begin(*run("refused"), None, model=replicated)
except SubnetscopeError as e:
    refusals["replicated"] = str(e)

callbacks = {"plain": SubnetTrackerCallback(), "view": SubnetTrackerCallback(view_dtype=torch.bfloat16),
             "offload": SubnetTrackerCallback(offload=True)}
for name, callback in callbacks.items():
    callback.on_train_begin(*run(name), None, model=model, processing_class=tok)
torch.manual_seed(1 + rank)  # each process its own batches
for step in range(1, steps + 1):
    ids = torch.randint(0, len(tok), (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    for name, callback in callbacks.items():
        callback.on_optimizer_step(run(name, step - 1)[0], run(name, step - 1)[1], None)
    whole = {n: p.full_tensor() for n, p in model.named_parameters()}  # what a trainer's checkpoint holds
    for name, callback in list(callbacks.items()):
        folder = out / name / f"checkpoint-{step}"
        if writer:
            folder.mkdir(parents=True)
            save_file(whole, str(folder / "model.safetensors"))
        dist.barrier()
        callback.on_save(*run(name, step), None)
    if step == resume_at:
        dist.barrier()
        for name in ("plain", "view"):
            if writer:
                shutil.copytree(out / name, out / f"{name}-resumed")
            dist.barrier()
            callbacks[f"{name}-resumed"] = resumed = SubnetTrackerCallback(
                view_dtype=callbacks[name].view_dtype)
            resumed.on_train_begin(*run(f"{name}-resumed", step), None, model=model, processing_class=tok)
histories = {name: [asdict(r) for r in callback.history] for name, callback in callbacks.items()}
(out / f"rank{rank}.json").write_text(json.dumps({"histories": histories, "refusals": refusals}))
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    """The two-process FSDP2 run: its folder, with each process's histories and refusals in rank<i>.json."""
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(out), str(STEPS), str(RESUME_AT)], capture_output=True, text=True, timeout=600,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def histories(out: Path, rank: int) -> dict[str, list[StepCounts]]:
    saved = json.loads((out / f"rank{rank}.json").read_text())["histories"]
    return {name: [StepCounts(**r) for r in records] for name, records in saved.items()}


def whole_weights(out: Path, step: int) -> dict[str, np.ndarray]:
    return load_file(str(out / "plain" / f"checkpoint-{step}" / "model.safetensors"))


@pytest.mark.slow
def test_summed_shard_counts_equal_a_diff_of_the_whole_weights(fsdp_run):
    out = fsdp_run
    theta0 = load_file(str(out / "theta0.safetensors"))
    by_rank = [histories(out, r) for r in (0, 1)]
    assert by_rank[0] == by_rank[1]  # every process holds the model's counts
    plain = by_rank[0]["plain"]
    assert by_rank[0]["offload"] == plain  # the shards' CPU mirror counts alike
    assert [r.step for r in plain] == list(range(1, STEPS + 1))
    base = load_file(str(out / "plain" / "base" / "model.safetensors"))
    assert set(base) == set(theta0) and all(np.array_equal(base[n], theta0[n]) for n in theta0)
    metrics = [json.loads(line) for line in (out / "plain" / "subnet_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # process 0 alone writes
    total = sum(a.size for a in theta0.values())
    previous, ever = theta0, {n: np.zeros(a.shape, bool) for n, a in theta0.items()}
    for record, logged in zip(plain, metrics):
        tuned = whole_weights(out, record.step)
        for i, name in enumerate(record.names):
            a, b = theta0[name], tuned[name]
            ever[name] |= a.view(np.uint32) != b.view(np.uint32)
            absd = np.abs(b.astype(np.float64) - a.astype(np.float64))
            assert record.numel[i] == a.size
            assert {r: record.vs_initial[r][i] for r in RULES} == numpy_counts(a, b), (record.step, name)
            assert {r: record.vs_previous[r][i] for r in RULES} == numpy_counts(previous[name], b), (record.step, name)
            assert record.ever_changed[i] == int(ever[name].sum()) and record.nonfinite[i] == 0
            assert record.abs_max[i] == float(np.abs(b - a).max())
            assert record.abs_sum[i] == pytest.approx(absd.sum(), rel=1e-5, abs=1e-12)
            assert record.abs_sq_sum[i] == pytest.approx((absd ** 2).sum(), rel=1e-5, abs=1e-12)
        exact = sum(numpy_counts(theta0[n], tuned[n])["exact"] for n in theta0)
        assert logged["changed/exact"] == exact / total and exact > 0
        assert logged["changed/ever_exact"] == sum(int(m.sum()) for m in ever.values()) / total
        assert logged["abs_delta/all/max"] == max(float(np.abs(tuned[n] - theta0[n]).max()) for n in theta0)
        state = load_file(str(out / "plain" / f"checkpoint-{record.step}" / TRACKER_FILE))
        for name in theta0:  # the saved state gathered whole: the step each weight first changed
            assert np.array_equal(state[f"first_changed::{name}"] >= 0, ever[name])
        previous = tuned


@pytest.mark.slow
def test_bf16_view_and_resume_under_fsdp2(fsdp_run):
    out = fsdp_run
    theta0 = load_file(str(out / "theta0.safetensors"))
    runs = histories(out, 0)
    check_view_run(out / "view", SimpleNamespace(history=runs["view"]), theta0, list(range(1, STEPS + 1)))
    masters = load_file(str(out / "view" / MASTER_BASE_FILE))
    assert set(masters) == set(theta0) and all(np.array_equal(masters[n], theta0[n]) for n in theta0)
    for name in ("plain", "view"):  # θ0, the masters' θ0 and the state sliced back to the shards
        resumed = runs[f"{name}-resumed"]
        assert [r.step for r in resumed] == list(range(RESUME_AT + 1, STEPS + 1))
        assert resumed == runs[name][RESUME_AT:]
        saved = load_file(str(out / f"{name}-resumed" / f"checkpoint-{STEPS}" / TRACKER_FILE))
        assert saved.keys() == load_file(str(out / name / f"checkpoint-{STEPS}" / TRACKER_FILE)).keys()


@pytest.mark.slow
def test_what_fsdp2_cannot_share_is_refused(fsdp_run):
    refusals = json.loads((fsdp_run / "rank0.json").read_text())["refusals"]
    assert "under FSDP2 the reference model cannot share θ0" in refusals["reference"]
    assert "(Replicate(),)" in refusals["replicated"] and "not HSDP or tensor parallel" in refusals["replicated"]
    assert refusals["partly"].startswith("transformer.wte.weight is a whole tensor beside FSDP2 shards "
                                         "(transformer.h.0.ln_1.weight)")
    assert not (fsdp_run / "refused").exists()


def test_fsdp1_flat_or_wrapped_parameters_are_refused(tmp_path):
    """FSDP1 (its wrapper's names, with use_orig_params) is refused in one line that points to FSDP2."""
    wrapper = torch.nn.Module()
    wrapper._fsdp_wrapped_module = tiny_model("gpt2", seed=0, vocab_size=len(word_tokenizer()))
    with pytest.raises(SubnetscopeError, match=r"sharded \(_fsdp_wrapped_module\.transformer\.wte\.weight: FSDP or "
                                               r"DeepSpeed ZeRO-3\) .* counts FSDP2's shards"):
        SubnetTrackerCallback().on_train_begin(*fake_run(tmp_path / "run"), None, model=wrapper)
    assert not (tmp_path / "run").exists()
