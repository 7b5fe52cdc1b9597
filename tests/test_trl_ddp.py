"""SubnetTrackerCallback under data parallelism: two CPU processes (torchrun; accelerate's DDP over gloo)
train TRL's SFTTrainer. Every process tracks its own replica (identical under DDP); process 0 alone writes
base/, the tracker's state and subnet_metrics.jsonl, whose counts must equal an independent numpy diff of
the saved checkpoint against base/. FSDP2's shards are counted per process and summed
(test_callback_fsdp.py); FSDP1's flat parameters and ZeRO-3's partitions are refused
(test_callback.py::test_sharded_parameters_are_refused)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from .test_callback import numpy_counts

SCRIPT = '''
import sys
import datasets
import torch.distributed as dist
from trl import SFTConfig, SFTTrainer
from subnetscope.callback import SubnetTrackerCallback
from subnetscope.models import load_tokenizer

model, out = sys.argv[1], sys.argv[2]
data = datasets.Dataset.from_dict({"prompt": [f"Sample {i:02d}:" for i in range(16)],
                                   "completion": [" a good one"] * 16})
args = SFTConfig(output_dir=out, max_steps=2, save_steps=1, logging_steps=1, per_device_train_batch_size=2,
                 learning_rate=1e-3, report_to="none", use_cpu=True)
callback = SubnetTrackerCallback()
trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=load_tokenizer(model),
                     callbacks=[callback])
trainer.train()
with open(f"{out}.rank{dist.get_rank()}", "w") as f:  # its own file: the processes' stdout interleave
    f.write(f"rank {dist.get_rank()} of {dist.get_world_size()} ({dist.get_backend()}): "
            f"{[r.total('vs_initial', 'exact') for r in callback.history]}")
'''


@pytest.mark.slow
def test_two_cpu_processes_track_like_one(tmp_path):
    from subnetscope.models import tiny_model, word_tokenizer

    tok = word_tokenizer()
    tiny_model("gpt2", vocab_size=len(tok)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           str(tmp_path / "tiny"), str(run)], capture_output=True, text=True, timeout=600,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [Path(f"{run}.rank{rank}").read_text() for rank in (0, 1)]
    assert [line.split(":")[0] for line in lines] == ["rank 0 of 2 (gloo)", "rank 1 of 2 (gloo)"]
    assert lines[0].split(":")[1] == lines[1].split(":")[1]  # the replicas agree
    assert "warning: accelerate launch" not in done.stderr
    metrics = [json.loads(line) for line in (run / "subnet_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # one writer
    base = load_file(str(run / "base" / "model.safetensors"))
    total = sum(a.size for a in base.values())
    for m in metrics:
        tuned = load_file(str(run / f"checkpoint-{m['step']}" / "model.safetensors"))
        exact = sum(numpy_counts(base[n], tuned[n])["exact"] for n in base)
        assert m["changed/exact"] == exact / total and exact > 0
    assert not np.array_equal(base["transformer.wte.weight"],
                              load_file(str(run / "checkpoint-2" / "model.safetensors"))["transformer.wte.weight"])
