"""The update tracker as a `transformers.TrainerCallback`, for any Trainer-based TRL trainer.

    trainer = GRPOTrainer(..., callbacks=[SubnetTrackerCallback()])   # or SFT, DPO, RLOO

At the start it saves θ0 to `<output_dir>/base` (so the analysis CLIs can read the trainer's own
`checkpoint-N` folders against it), snapshots θ0, and after every optimizer step records the
changed counts and appends the tracker's metrics to `<output_dir>/subnet_metrics.jsonl`; they
are also added to the trainer's logs, so W&B and the console show them. Each checkpoint gets the
tracker's state, so `trainer.train(resume_from_checkpoint=True)` continues it against the saved θ0.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .changes import ChangeRules
from .checkpoint import BASE_DIR, open_checkpoint
from .logger import MetricsLogger
from .tracker import StepCounts, UpdateTracker


TRACKER_FILE = "subnet_tracker.safetensors"


def _strip_wrapper(name: str) -> str:
    return name[len("module."):] if name.startswith("module.") else name


class SubnetTrackerCallback(TrainerCallback):
    def __init__(self, rules: ChangeRules = ChangeRules(), topk: int = 3, save_base: bool = True):
        self.rules = rules
        self.topk = topk
        self.save_base = save_base
        self.tracker: UpdateTracker | None = None
        self.logger: MetricsLogger | None = None
        self._pending: dict[str, float] = {}

    @property
    def history(self) -> list[StepCounts]:
        return self.tracker.history if self.tracker else []

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        params = {_strip_wrapper(n): p for n, p in model.named_parameters() if p.requires_grad}
        out = Path(args.output_dir)
        resumed = state.global_step > 0 and (out / BASE_DIR).is_dir()
        initial = None
        if resumed:  # θ0 is the saved base, not the weights the trainer just restored
            base = open_checkpoint(str(out / BASE_DIR))
            initial = {n: base.get(n).to(p.device, p.dtype) for n, p in params.items()}
        self.tracker = UpdateTracker(params, self.rules, initial=initial, max_steps=max(state.max_steps, 1),
                                     topk=self.topk)
        saved = out / f"checkpoint-{state.global_step}" / TRACKER_FILE
        if resumed and saved.is_file():
            self.tracker.load_state_dict({k: v.to(params[k.split("::", 1)[1]].device) for k, v in load_file(str(saved)).items()})
        if state.is_world_process_zero:
            out.mkdir(parents=True, exist_ok=True)
            if self.save_base and not (out / BASE_DIR).exists():
                model.save_pretrained(out / BASE_DIR)
                if processing_class is not None:
                    processing_class.save_pretrained(out / BASE_DIR)
        self.logger = MetricsLogger(out, None, {}, resume_step=state.global_step,
                                    enabled=state.is_world_process_zero, filename="subnet_metrics.jsonl")

    def on_save(self, args, state, control, **kwargs):
        """Keep the tracker's state beside the trainer's checkpoint, for resume_from_checkpoint."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            save_file({k: v.cpu().contiguous() for k, v in self.tracker.state_dict().items()}, str(folder / TRACKER_FILE))

    def on_optimizer_step(self, args, state, control, **kwargs):
        record = self.tracker.update(state.global_step + 1)
        self._pending = self.tracker.metrics(record)
        self.logger.log(record.step, self._pending)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._pending:
            logs.update({f"subnet/{k}": v for k, v in self._pending.items() if k.startswith(("changed/", "sparsity/"))})
