"""What every RL trainer here shares: settings, the tracker, checkpoints (models, prompts, rewards: env.build_env).

A trainer subclasses `RLTrainer` and implements `train_step`; the base class owns the run folder,
resume, evaluation, logging and the loop. Data-parallel through accelerate: each process takes
whole prompts (and their groups), so per-prompt statistics never need other ranks.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .aspg import ASPG, PlanASPG, TopKHookState, hook_report, register_topk_hook
from .changes import RULES, ChangeRules
from .config import OPTIMIZERS, RLConfig, RunConfig  # noqa: F401 (re-exported: the settings live in config.py)
from .confine import ConfinedUpdates, compare_with_full_run, trainable_weights
from .data import chat_prompts
from .env import build_env, disable_dropout  # noqa: F401 (disable_dropout re-exported: it lives in env.py)
from .errors import SubnetscopeError, warn
from .logger import MetricsLogger, check_wandb
from .masks import MaskSet, check_masks_fit, load_masks
from .outputs import check_output_dir
from .precision import Precision
from .report import write_json
from .rewards import RewardFunction, score_rollout
from .rundir import FINAL_DIR, HEADER_BYTES, STEP_FILES, ResumePoint, RunDir, save_model, tensor_bytes
from .runstate import (
    MASTER_FILE,
    check_run_folder,
    describe_changes,
    keeps_masters,
    load_step,
    record_resume,
    save_rl_step,
    settings_changes,
    write_new_run_config,
)
from .sampling import Rollout, generate
from .seeds import EVAL_SAMPLING_STEP, SHORT_STRIDE, stream_seed
from .tracker import UpdateTracker

if TYPE_CHECKING:
    from accelerate import Accelerator

MASTER_PREFIX = "master::"  # tracker.safetensors keys of the master-weight tracker


@dataclass
class RunStart:
    """What the checks before a run's first write found: the run being resumed (its run_config.json)
    and the checkpoint it continues from."""

    run_dir: Path
    saved: dict | None = None
    point: ResumePoint = field(default_factory=lambda: ResumePoint(None))

    def finished(self, max_steps: int) -> bool:
        """A --resume of a run that reached max_steps and wrote its final model: nothing to train."""
        return (self.point.folder is not None and self.point.step >= max_steps
                and RunDir(self.run_dir).final_is_written())


def check_run_start(config: RunConfig, algorithm: str, weights: tuple[str, ...] | None = None,
                    required: tuple[str, ...] | None = None) -> RunStart:
    """Everything a run could refuse that needs no model: its settings, --output_dir, --wandb, and the
    folder (a --resume of the same algorithm with the same settings). Writes nothing. `weights` and
    `required` name the files of a complete checkpoint (default: this module's step_N)."""
    config.validate()
    run_dir = Path(config.output_dir)
    check_output_dir(run_dir)
    check_wandb(config.wandb)
    saved = check_run_folder(run_dir, algorithm, asdict(config), config.resume, config.allow_changed_settings)
    if not config.resume:
        return RunStart(run_dir)
    if required is None and saved is not None and keeps_masters(saved["settings"]):
        required = (*STEP_FILES, MASTER_FILE)
    files = {k: v for k, v in (("one_of", weights), ("required", required)) if v is not None}
    return RunStart(run_dir, saved, RunDir(run_dir).latest(**files))


def last_record(path: Path, step: int | None = None) -> dict:
    """The last metrics record (at or before `step`), with its step; {} when there is none."""
    records = RunDir(Path(path).parent).metrics(Path(path).name)
    records = [r for r in records if step is None or r.get("step", 0) <= step]
    return records[-1] if records else {}


def step_prompt_ids(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Which of `n` prompts `step` takes, over all processes: each epoch walks its own seeded permutation."""
    start = (step - 1) * batch_size
    epoch_seed = stream_seed(seed, start // n, SHORT_STRIDE)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
    return [order[(start + i) % n] for i in range(batch_size)]


def step_prompts(prompts: list[str], step: int, batch_size: int, seed: int, group: int, rank: int = 0,
                 world: int = 1) -> tuple[list[str], torch.Tensor]:
    """Process `rank` of `world`'s share of `step`'s prompts, each repeated `group` times, and their global
    row ids (prompt i's g-th completion is row i * group + g, whichever process draws it)."""
    chosen = step_prompt_ids(len(prompts), step, batch_size, seed)
    per_rank = batch_size // world
    own = range(rank * per_rank, (rank + 1) * per_rank)
    return ([prompts[chosen[i]] for i in own for _ in range(group)],
            torch.tensor([i * group + g for i in own for g in range(group)]))


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets] in float32, one row at a time to bound memory."""
    rows = [torch.log_softmax(row.float(), dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)
            for row, t in zip(logits, targets)]
    return torch.stack(rows)


def per_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int,
                    temperature: float) -> torch.Tensor:
    """Log-probabilities of the last `n_completion` tokens under softmax(logits / T), as sampled.

    Masked positions get the row's first real token instead of the pad token: a pad embedding of
    zeros (random Gemma-3n inits) makes AltUp's magnitude sqrt give NaN gradients, mask or not.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    first_real = input_ids.gather(1, attention_mask.long().argmax(1, keepdim=True))
    input_ids = torch.where(attention_mask.bool(), input_ids, first_real)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=n_completion + 1, use_cache=False).logits
    logits = logits[:, :-1, :] / temperature
    return selective_log_softmax(logits, input_ids[:, -n_completion:])


@torch.no_grad()
def reference_logps(ref: torch.nn.Module | None, ref_device: str, precision: Precision, rollout: Rollout,
                    temperature: float, device: str) -> torch.Tensor | None:
    """The frozen reference's completion log-probabilities (on its own device, moved to `device`); None
    without a reference."""
    if ref is None:
        return None
    ids, mask = rollout.input_ids.to(ref_device), rollout.attention_mask.to(ref_device)
    with precision.autocast(ref_device):
        logps = per_token_logps(ref, ids, mask, rollout.completion_ids.shape[1], temperature)
    return logps.to(device)


def precision_settings(precision: Precision) -> dict[str, str]:
    """What run_config.json keeps of the resolved precision (`--precision auto` becomes what it chose)."""
    return {f"{key}_used": value for key, value in precision.record().items()}


def shown_precision(used: dict[str, str]) -> str:
    return f"{used['precision_used']} precision (judged at {used['view_dtype_used']})"


def build_optimizer(params, config: RLConfig) -> torch.optim.Optimizer:
    """The run's --optimizer over `params`, with its settings."""
    name, lr, weight_decay = config.optimizer, config.lr, config.weight_decay
    if name == "aspg":
        return ASPG(params, lr=lr, weight_decay=weight_decay, sparsity=config.aspg_sparsity, warmup=config.aspg_warmup)
    if name == "aspg_plan":
        return PlanASPG(params, lr=lr, update_fraction=config.aspg_update_fraction, warmup=config.aspg_warmup)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                     warmup_init=False)


def plain_accelerator(cpu: bool) -> Accelerator:
    """An Accelerator that adds no autocast of its own: --precision decides every dtype. Its state is a
    process-wide singleton, so a TRL trainer with bf16=True run earlier in the process (a notebook, a test) left
    bf16 autocast that `prepare` would wrap the policy in, silently turning an fp32 run into a bf16 one (its
    loss moved by 0.2%); `accelerate launch --mixed_precision bf16` asks the same through the environment."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":
        warn(f"accelerate's mixed precision ({os.environ['ACCELERATE_MIXED_PRECISION']}) is ignored: --precision "
             "decides the dtypes here (mixed: fp32 masters, bf16 compute)")
    if AcceleratorState._shared_state.get("_mixed_precision", "no") != "no":
        AcceleratorState._reset_state()  # the process group (PartialState) stays
    return Accelerator(cpu=cpu, mixed_precision="no")


class RLTrainer:
    """The loop and everything around it; subclasses implement `train_step` (and may add modules)."""

    name = "RL"
    completions_per_prompt = 1

    def __init__(self, config: RLConfig, reward_fn: RewardFunction | None = None):
        self.config = config
        self.start = check_run_start(config, self.name)
        self.accelerator = plain_accelerator(cpu=config.device == "cpu")
        self.check_split(self.accelerator.num_processes)
        self._check_comm_hook()
        self.run_dir = Path(config.output_dir)
        self.run = RunDir(self.run_dir)
        env = build_env(config, str(self.accelerator.device), reward_fn)
        self.device, self.precision, self.tokenizer = env.device, env.precision, env.tokenizer
        self.policy, self.ref, self.ref_device, self.sampler = env.policy, env.ref, env.ref_device, env.sampler
        self.reward_fn, self.prompts, self.eval_prompts = env.reward_fn, env.prompts, env.eval_prompts
        self.chat_template = env.chat_template
        self._model_text = self._templated(self.prompts + self.eval_prompts)
        self.params = dict(self.policy.named_parameters())
        mask_set = self._load_update_mask()
        self.trainable_weights = trainable_weights(self.params, mask_set.masks if mask_set else None,
                                                   config.train_unmasked)
        self.extra_modules = self.build_extra_modules()
        trainable = list(self.policy.parameters()) + [p for m in self.extra_modules.values() for p in m.parameters()]
        self.optimizer = build_optimizer(trainable, config)
        self.sparse_optimizer = self.optimizer if isinstance(self.optimizer, (ASPG, PlanASPG)) else None
        self._prepare_run_dir()
        rules = ChangeRules(config.atol, config.eta)
        view = self.precision.view if self.precision.rounds else None
        self.tracker = UpdateTracker(self.params, rules, initial=self._theta0(), max_steps=config.max_steps,
                                     topk=config.topk, view_dtype=view)
        # the trained (fp32 master) weights themselves, when what is judged is their rounding
        self.master_tracker = (UpdateTracker(self.params, rules, max_steps=config.max_steps, topk=config.topk)
                               if self.precision.rounds else None)
        anchors = (self.master_tracker or self.tracker).initial  # θ0 in the trained weights' own dtype
        self.confined = (ConfinedUpdates(self.params, mask_set.masks, anchors=anchors,
                                         freeze_unmasked=not config.train_unmasked) if mask_set else None)
        if mask_set:
            total = sum(p.numel() for p in self.params.values())
            rest = "trained" if config.train_unmasked else "held at θ0 (--train_unmasked trains them)"
            self._print(f"--update_mask: {self.trainable_weights:,} of {total:,} weights trainable "
                        f"({self.trainable_weights / total:.2%}); tensors the mask does not cover are {rest}")
        self.full_run = self._full_run(mask_set)
        self.start_step = 0
        self.skipped_rewards = 0
        if self.start.point.folder is not None:
            self._resume(self.start.point.folder)
        if self.start.saved is not None:
            self._record_settings()
        for name, module in self.extra_modules.items():
            self.extra_modules[name] = self.accelerator.prepare(module.to(self.device))
        self.model, self.optimizer = self.accelerator.prepare(self.policy, self.optimizer)
        self.comm_hooks = self._register_comm_hooks()
        self.logger = MetricsLogger(self.run_dir, config.wandb, self._settings(), self.start_step,
                                    enabled=self.accelerator.is_main_process)

    def check_split(self, world: int) -> None:
        """The batch must split over the processes; checked before anything is loaded or written."""
        if self.config.batch_size % world:
            raise SubnetscopeError(f"--batch_size {self.config.batch_size} does not split over {world} processes: "
                                   f"use a multiple of {world}")

    def _check_comm_hook(self) -> None:
        """--ddp_topk_density needs DDP over several processes; checked before anything is loaded or written."""
        kind, world = self.accelerator.distributed_type, self.accelerator.num_processes
        if self.config.ddp_topk_density is not None and (world < 2 or not kind.value.startswith("MULTI_")):
            raise SubnetscopeError(f"--ddp_topk_density compresses DDP's gradient all-reduce between processes; this "
                                   f"run has {world} process(es) ({kind.value}): launch several with torchrun "
                                   "--nproc_per_node N or accelerate launch (DDP, not FSDP or DeepSpeed), or leave "
                                   "it out")

    def _register_comm_hooks(self) -> list[TopKHookState]:
        """--ddp_topk_density: the top-k hook on every DDP-wrapped module (the policy; PPO's value head)."""
        if self.config.ddp_topk_density is None:
            return []
        wrapped = (self.model, *self.extra_modules.values())
        return [register_topk_hook(m, self.config.ddp_topk_density) for m in wrapped
                if isinstance(m, torch.nn.parallel.DistributedDataParallel)]

    def _optimizer_metrics(self) -> dict[str, float]:
        """ASPG's share of entries updated, state bytes and FLOPs saved; the top-k hook's bytes beside the
        dense all-reduce's (this process's, over the step)."""
        out = self.sparse_optimizer.report() if self.sparse_optimizer is not None else {}
        if self.comm_hooks:
            out.update(hook_report(self.comm_hooks))
        return out

    def _load_update_mask(self) -> MaskSet | None:
        """--update_mask: read and checked against the model before the run folder is written."""
        if not self.config.update_mask:
            return None
        try:
            mask_set = load_masks(self.config.update_mask)
        except SubnetscopeError as err:
            raise SubnetscopeError(f"--update_mask: {err}") from None
        check_masks_fit(mask_set, self.params, f"--update_mask {self.config.update_mask}")
        return mask_set

    @staticmethod
    def _full_run(mask_set: MaskSet | None) -> Path | None:
        """The full run an --update_mask came from (compute_masks.py --from_run), to compare with at the end."""
        source = mask_set.settings.get("source_run") if mask_set else None
        return Path(source) if source and (Path(source) / FINAL_DIR).is_dir() else None

    def _settings(self) -> dict:
        return {**asdict(self.config), **precision_settings(self.precision),
                "chat_template_applied": self.chat_template, "trainable_weights": self.trainable_weights}

    def _templated(self, prompts: list[str]) -> dict[str, str]:
        """Each prompt as the policy sees it: a user turn of its chat template (rewards keep the plain text)."""
        unique = list(dict.fromkeys(prompts))
        return dict(zip(unique, chat_prompts(self.tokenizer, unique) if self.chat_template else unique))

    def model_text(self, prompts: list[str]) -> list[str]:
        return [self._model_text[p] for p in prompts]

    @torch.no_grad()
    def _refreshed_sampler(self) -> torch.nn.Module:
        """The model rollouts sample from: the policy itself, or the sampler holding its current weights
        rounded to the compute dtype (one multi-tensor copy; tied weights are one parameter on both)."""
        policy = self.accelerator.unwrap_model(self.model)
        if self.sampler is None:
            return policy
        masters = dict(policy.named_parameters())
        pairs = [(p, masters[n].detach()) for n, p in self.sampler.named_parameters()]  # paired by name
        torch._foreach_copy_([p for p, _ in pairs], [m for _, m in pairs])
        return self.sampler

    def autocast(self, device: str | None = None):
        """Every forward pass runs under this: bf16 autocast under mixed precision, else nothing."""
        return self.precision.autocast(device or self.device)

    def _tracker_state(self) -> dict[str, torch.Tensor]:
        state = self.tracker.state_dict()
        if self.master_tracker is not None:
            state.update({f"{MASTER_PREFIX}{k}": v for k, v in self.master_tracker.state_dict().items()})
        return state

    def _resume(self, folder: Path) -> None:
        """Weights (the fp32 masters, where kept), optimizer, RNG, trackers and the trainer's own state."""
        self.start_step, tracker_state, extra, tensors = load_step(folder, self.params, self.optimizer)
        state = {k: v.to(self.device) for k, v in tracker_state.items()}
        view = {k: v for k, v in state.items() if not k.startswith(MASTER_PREFIX)}
        self.tracker.load_state_dict(view)
        if self.master_tracker is not None:
            # a step saved without masters (--allow_changed_settings from fp32 or bf16) judged its weights themselves
            master = {k.removeprefix(MASTER_PREFIX): v for k, v in state.items() if k.startswith(MASTER_PREFIX)}
            self.master_tracker.load_state_dict(master or view)
        self.load_extra_state(extra, tensors)
        self._print(f"resumed from {folder} at step {self.start_step}")

    def _record_settings(self) -> None:
        """run_config.json's settings brought up to date on resume, each changed one recorded."""
        if self.accelerator.is_main_process:
            changes = record_resume(self.run_dir, self.start.saved, self._settings(), self.start_step)
            if changes:
                self._print(f"settings changed after step {self.start_step} (recorded in run_config.json): "
                            f"{describe_changes(changes)}")
        self.accelerator.wait_for_everyone()

    def build_extra_modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules beside the policy (PPO's value head); the tracker ignores them."""
        return {}

    def extra_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able state, tensors) that a resumed run needs beyond weights and optimizer."""
        return {"skipped_rewards": self.skipped_rewards}, {}

    def load_extra_state(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.skipped_rewards = int(state.get("skipped_rewards", 0))

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def _print(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(msg)

    def _theta0(self) -> dict[str, torch.Tensor] | None:
        """The reference model's weights serve as θ0 when they sit where the policy's do: the update tracker then
        owns the θ0 buffer and rebinds the reference's parameters to it (one copy; see env.Env); else it copies
        θ0 from the policy."""
        if self.ref is None or self.ref_device != self.device:
            return None
        ref_params = dict(self.ref.named_parameters())
        return {n: ref_params[n] for n in self.params}

    def _prepare_run_dir(self) -> None:
        """A resumed run must fit this model and precision; a new one gets θ0 and run_config.json. Both
        first lose what killed writes left behind."""
        run, saved = self.run_dir, self.start.saved
        if saved is not None:
            self.run.check_resumable(self.policy, saved)
            used = precision_settings(self.precision)
            if settings_changes(saved["settings"], used) and not self.config.allow_changed_settings:
                theirs = {k: saved["settings"].get(k, v) for k, v in used.items()}
                raise SubnetscopeError(f"--resume: {run} was trained in {shown_precision(theirs)}; --precision "
                                       f"{self.config.precision} on {self.device} gives {shown_precision(used)}: pass "
                                       "the run's --precision and --view_dtype, or --allow_changed_settings")
        if self.accelerator.is_main_process:
            removed = self.run.clean_stale_temps()
            if removed:
                self._print(f"removed what killed writes left in {run}: {', '.join(removed)}")
            for note in self.start.point.notes():
                self._print(f"note: {note}")
            if self.config.resume and self.start.point.folder is None and not self.start.point.skipped:
                self._print(f"--resume: {run} has no complete checkpoint yet; starting from step 0")
            if saved is None:
                self.run.create(self.policy, self.tokenizer, self.precision.view)
                write_new_run_config(run, self.name, self._settings(), self.policy)
        self.accelerator.wait_for_everyone()

    def _step_prompts(self, step: int) -> tuple[list[str], torch.Tensor]:
        """This process's prompts for `step` (repeated per group) and their global row ids."""
        cfg = self.config
        return step_prompts(self.prompts, step, cfg.batch_size, cfg.seed, self.completions_per_prompt,
                            self.accelerator.process_index, self.accelerator.num_processes)

    def _rewards(self, prompts: list[str], rollout: Rollout, training: bool = True) -> torch.Tensor:
        """Rewards as a tensor; NaN/inf become NaN (advantage 0) and, in training, are counted."""
        rewards = score_rollout(self.reward_fn, prompts, rollout)
        if training:
            self.skipped_rewards += int(torch.isnan(rewards).sum())
        return rewards

    def _ref_logps(self, rollout: Rollout) -> torch.Tensor | None:
        return reference_logps(self.ref, self.ref_device, self.precision, rollout, self.config.temperature,
                               self.device)

    def policy_logps(self, model, ids: torch.Tensor, mask: torch.Tensor, n_completion: int) -> torch.Tensor:
        """The policy's completion log-probabilities, computed as every forward pass here is."""
        with self.autocast():
            return per_token_logps(model, ids, mask, n_completion, self.config.temperature)

    def _generate(self, prompts: list[str], rows: torch.Tensor, step: int, greedy: bool = False,
                  static_cache: bool = False) -> Rollout:
        """Completions of the policy for `prompts` (plain text; the model sees them templated)."""
        sampler = self._refreshed_sampler()  # in the compute dtype already: no autocast needed
        return generate(sampler, self.tokenizer, self.model_text(prompts), rows, seed=self.config.seed,
                        step=step, max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature,
                        greedy=greedy, static_cache=static_cache)

    def _rollout(self, step: int) -> tuple[list[str], Rollout]:
        prompts, rows = self._step_prompts(step)
        static = self.device.startswith("cuda") and not self.config.gradient_checkpointing
        return prompts, self._generate(prompts, rows, step, static_cache=static)

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)
        if self.confined:
            self.confined.mask_gradients_()
        if self.config.max_grad_norm > 0:
            params = list(self.model.parameters()) + [p for m in self.extra_modules.values() for p in m.parameters()]
            self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.confined:
            self.confined.project_()

    def _common_metrics(self, rewards: torch.Tensor, completion_mask: torch.Tensor, t0: float, t_gen: float,
                        tracker_s: float) -> dict[str, float]:
        t_end = time.perf_counter()
        gathered = self.accelerator.gather(rewards.to(self.device))
        tokens = float(self.accelerator.gather(completion_mask.sum().reshape(1)).sum())
        metrics = {
            "reward/mean": float(torch.nanmean(gathered)), "reward/std": float(torch.nan_to_num(gathered).std()),
            "skipped_rewards": self.skipped_rewards, "time/step": t_end - t0, "time/rollout": t_gen - t0,
            "time/tracker": tracker_s, "throughput/tokens_per_s": tokens / (t_end - t0),
            "completion_length": tokens / gathered.numel(),
        }
        if self.device.startswith("cuda"):
            metrics["memory/peak_gpu_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        return metrics

    def _track(self, step: int) -> tuple[dict[str, float], float]:
        """The tracker's update and metrics, and the seconds it took (its work alone)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        record = self.tracker.update(step)
        master = self.master_tracker.update(step) if self.master_tracker is not None else None
        seconds = time.perf_counter() - t0
        metrics = self.tracker.metrics(record)
        if not self.config.log_localization:
            metrics = {k: v for k, v in metrics.items() if not k.startswith("localization/")}
        if master is not None:
            total = sum(master.numel)
            metrics.update({f"changed_master/{rule}": master.total("vs_initial", rule) / total for rule in RULES})
        return metrics, seconds

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean reward and KL on the held-out prompts, greedy and sampled (fixed noise)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        out = {}
        rows = torch.arange(len(self.eval_prompts))
        for mode, greedy in (("greedy", True), ("sampled", False)):
            rollout = self._generate(self.eval_prompts, rows, EVAL_SAMPLING_STEP, greedy=greedy)
            rewards = self._rewards(self.eval_prompts, rollout, training=False)
            out[f"eval/{mode}/reward"] = float(torch.nanmean(rewards))
            if self.ref is not None:
                ids, mask = rollout.input_ids.to(self.device), rollout.attention_mask.to(self.device)
                logps = self.policy_logps(unwrapped, ids, mask, rollout.completion_ids.shape[1])
                ref = self._ref_logps(rollout)
                cm = rollout.completion_mask.to(self.device).float()
                kl = torch.exp(ref - logps) - (ref - logps) - 1
                out[f"eval/{mode}/kl"] = float(((kl * cm).sum(-1) / cm.sum(-1).clamp(min=1)).mean())
        return out

    def _save(self, step: int) -> None:
        """step_N at the view dtype (what would be published), with the fp32 masters beside it for resume."""
        if self.accelerator.is_main_process:
            extra, tensors = self.extra_state()
            published = {n: self.tracker.published(n) for n in self.params}
            masters = self.params if self.master_tracker is not None else None
            save_rl_step(self.run, step, published, self.tracker.exact_masks(), self.optimizer, self._tracker_state(),
                         self.config.full_checkpoints, extra=extra, extra_tensors=tensors, masters=masters)
            if self.config.save_total_limit:
                self.run.drop_old_steps(self.config.save_total_limit)
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def _check_finite(self, step: int) -> None:
        """Stop a run whose weights hold NaN or inf, before it logs or saves them: one reduction per tensor
        on the device (max |w|, NaN-propagating) and a single host sync per step."""
        names = [n for n, p in self.params.items() if p.numel()]  # an empty tensor has no max to take
        norms = torch._foreach_norm([self.params[n].detach() for n in names], ord=math.inf)
        finite = torch.isfinite(torch.stack([n.float() for n in norms]))
        if bool(finite.all()):
            return
        bad = [names[i] for i in (~finite).nonzero().flatten().tolist()]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SubnetscopeError(f"step {step}: the weights became NaN or inf in {', '.join(bad[:3])}{more}; the run "
                               f"stopped before saving this step (its last checkpoint stays): lower --lr, set "
                               "--max_grad_norm, or train in --precision mixed or fp32")

    def _write_final(self) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model)

        def write(tmp: Path) -> None:
            save_model(unwrapped, tmp, self.precision.view)
            self.tokenizer.save_pretrained(tmp)

        self.run.finalize(write, tensor_bytes(unwrapped.parameters()) + HEADER_BYTES)

    def _write_subnetwork_comparison(self) -> None:
        rules = ChangeRules(self.config.atol, self.config.eta)
        result = compare_with_full_run(self.run_dir, self.full_run, rules, self.device)
        write_json(self.run_dir / "subnetwork_comparison.json", result)
        same = result["identical_fraction"]
        self._print(f"subnetwork-only vs the full run {self.full_run}: identical weights exact {same['exact']:.2%}, "
                    f"atol {same['atol']:.2%}, relative {same['relative']:.2%}; final reward "
                    f"{result['subnetwork_run']['reward']} vs {result['full_run_final']['reward']}")

    def train(self) -> dict[str, float]:
        """Train from the start (or resumed) step to max_steps; the last step's metrics, with its step.
        A resumed run that already reached max_steps trains nothing and returns its last record."""
        cfg = self.config
        last: dict[str, float] = last_record(self.run_dir / "metrics.jsonl", self.start_step)
        bar = tqdm(range(self.start_step + 1, cfg.max_steps + 1), initial=min(self.start_step, cfg.max_steps),
                   total=cfg.max_steps, desc=self.name, disable=cfg.no_tqdm or not self.accelerator.is_main_process)
        for step in bar:
            metrics = self.train_step(step)
            metrics.update(self._optimizer_metrics())
            self._check_finite(step)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                metrics.update(self.evaluate())
            self.logger.log(step, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl', 0.0):.4f}",
                            changed=f"{metrics['changed/relative']:.2%}")
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                self._save(step)
            last = {"step": step, **metrics}
        trained = self.start_step < cfg.max_steps
        if self.accelerator.is_main_process and (trained or not self.run.final_is_written()):
            self._write_final()
            if self.full_run is not None:
                self._write_subnetwork_comparison()
        elif not trained:
            self._print(f"{self.run_dir} already reached step {self.start_step} (--max_steps {cfg.max_steps}): "
                        "nothing to train")
        self.accelerator.wait_for_everyone()
        self.logger.close()
        if self.skipped_rewards and trained:
            warn(f"{self.skipped_rewards} completions had NaN or inf rewards; they got advantage 0")
        return last
