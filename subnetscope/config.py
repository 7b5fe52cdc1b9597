"""The settings of every training run (RL, baselines, pruning, sparse fine-tuning, the testbed's build and
study) and the names their flags choose from, compute_masks.py's included.

Torch-free on purpose: the training commands build their parsers (and answer `--help`) from these
dataclasses, and refuse bad settings, before anything heavy is imported; torch, transformers and TRL load
after the checks. The trainers' modules re-export what they used to define (`from subnetscope.rl import
RLConfig` works).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SubnetscopeError
from .rewards import REWARDS

# --optimizer of the RL loops; TRL's trainers (SFT, DPO) take the TRL_OPTIMIZERS keys
OPTIMIZERS = ("adamw", "adafactor", "sgd", "aspg", "aspg_plan")
TRL_OPTIMIZERS = {"adamw": "adamw_torch", "adafactor": "adafactor", "sgd": "sgd"}  # ours -> TRL's `optim`
# ASPG's defaults: aspg's share of entries NOT updated and dense warm-up; aspg_plan's share updated and warm-up
ASPG_SPARSITY = 0.9
ASPG_WARMUP = 10
PLAN_UPDATE_FRACTION = 0.01
PLAN_WARMUP = 100
PRECISIONS = ("auto", "mixed", "bf16", "fp32")  # subnetscope.precision explains each
VIEW_DTYPE_NAMES = ("bfloat16", "float16", "float32")  # --view_dtype; precision.VIEW_DTYPES maps them to dtypes
TINY_MODELS = ("tiny-gpt2", "tiny-gemma3n")
# Random weights in real shapes, for speed and memory runs without the Hub; vocabulary = the tokenizer's.
RANDOM_SHAPED = ("random-gpt2-medium", "random-gemma3n-e2b")
SFT_DATA = ("samples", "positive_reviews", "completions")
# main_prune.py's text and ramps (subnetscope.pruning)
DEFAULT_TEXT = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt")
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
RAMPS = ("linear", "cubic")
# main_sparse_ft.py's --method and --lora_mode (subnetscope.sparse_lora explains the modes)
SPARSE_FT_METHODS = ("masked", "lora")
LORA_MODES = ("sparse_to_dense", "sparse_to_sparse")
# compute_masks.py's choices (subnetscope.importance explains each)
IMPORTANCES = ("magnitude", "gradient", "taylor", "wanda")
MASK_METHODS = ("unstructured", "structured", "random", "nm")
MASK_GROUPS = ("matrix", "row", "global")
MASK_EXTRA_TENSORS = ("embeddings", "norms", "lm_head")
# testbed.py study's --algos and the run-matrix task each one runs as (subnetscope.study)
STUDY_ALGOS = {"grpo": "rl-grpo", "ppo": "rl-ppo", "sft": "sft", "dpo": "dpo"}


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A field and its flag in one place: `help` and the flag's other metadata (subnetscope.cli.dataclass_args)."""
    if isinstance(default, list):  # a mutable default: each config gets its own copy
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def yes_no(text: str) -> bool:
    """A yes/no flag's value (the study's switches are spelled `--contrast no`, as its recorded commands are)."""
    if text.lower() not in ("yes", "no", "true", "false"):
        raise argparse.ArgumentTypeError("use yes or no")
    return text.lower() in ("yes", "true")


def same_setting(cls: type, name: str) -> Any:
    """Field `name` of `cls` declared again (default, help and flag metadata), for another command's config
    that has the same setting: described once."""
    declared = cls.__dataclass_fields__[name]
    return field(default=declared.default, default_factory=declared.default_factory, metadata=declared.metadata)


def check_at_least_one(config: Any, keys: tuple[str, ...], prefix: str = "--") -> None:
    """One line for the first of `keys` whose setting is below 1 (`prefix`: how the message names it)."""
    for key in keys:
        if getattr(config, key) < 1:
            raise SubnetscopeError(f"{prefix}{key} {getattr(config, key)}: needs at least 1")


def reward_spec(value: str) -> str:
    """--reward: a reward's name, or module:function, imported now so that a bad one is refused before any work."""
    if value in REWARDS:
        return value
    if ":" not in value:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(REWARDS)}, "
                                         "or module:function)")
    from .reward_import import import_reward

    import_reward(value)
    return value


@dataclass
class RunConfig:
    """Settings of every fine-tuning run here, RL or baseline. Each field is a flag and a --config key; its
    metadata's help is the flag's help (subnetscope.cli.dataclass_args appends the default)."""

    policy: str = setting("tiny-gpt2", f"policy to fine-tune: Hub id, folder, {' / '.join(TINY_MODELS)} (random, "
                          f"offline), or {' / '.join(RANDOM_SHAPED)} (random weights in real shapes)")
    tokenizer: str | None = setting(None, "tokenizer for policies that have none (random-gpt2-medium, "
                                          "random-gemma3n-e2b: gpt2 from the Hub; offline ../shared/models/tiny-gpt2); "
                                          "none: the policy's own")
    reward: str = setting("vader", "reward: VADER lexicon, a classifier (--reward_model), the toy reward, exact match "
                                   "of the final number, or a TRL-style reward callable f(completions, **kwargs) named "
                                   "module:function (a module or .py file); naming --reward_model selects model",
                          type=reward_spec, metavar="{" + ",".join(REWARDS) + ",module:function}")
    reward_model: str = setting("lvwerra/distilbert-imdb", "sequence classifier of --reward model; naming one selects "
                                                          "--reward model; score = POSITIVE logit")
    dataset: str = setting("builtin", "prompts: builtin, easy, imdb (through datasets), or a "
                                      ".json/.jsonl/.csv/.txt[.gz] file such as ../shared/data/imdb/train.jsonl.gz")
    batch_size: int = setting(8, "RL: prompts per step, over all processes; SFT/DPO: examples per device per "
                                 "step")
    max_steps: int = setting(20, "optimizer updates")
    lr: float = setting(1e-5, "learning rate", aliases=("learning_rate",))
    optimizer: str = setting("adamw", "aspg = adaptive sparse policy gradients: AdamW updating only the most important "
                                      "entries (EMA of |grad|) after a dense warm-up, with error feedback; aspg_plan = "
                                      "ASPG as the research plan writes it: a plain step w -= lr*grad on the most "
                                      "important entries, the other gradients dropped, no weight decay",
                             choices=OPTIMIZERS)
    temperature: float = setting(1.0, "sampling temperature")
    max_prompt_tokens: int = setting(32, "prompts are cut to this many tokens")
    max_new_tokens: int = setting(32, "completion length")
    precision: str = setting("auto", "mixed: fp32 master weights and optimizer, bf16 autocast, judged and checkpointed "
                                     "as bf16 roundings (what recipes publish); bf16: bf16 weights (Adam steps below "
                                     "half a bf16 step are lost: sparsity then measures bf16 stagnation); fp32; auto: "
                                     "mixed on a CUDA GPU with bf16, else fp32 (subnetscope.precision)",
                             choices=PRECISIONS)
    view_dtype: str | None = setting(None, "dtype at which changes are judged and base/, checkpoints and final/ "
                                           "stored; none: bfloat16 for mixed and bf16, float32 for fp32",
                                     choices=VIEW_DTYPE_NAMES)
    chat_template: bool = setting(True, "instruct models: each prompt becomes a user turn of the tokenizer's chat "
                                        "template (when it has one; rewards always see the plain text); "
                                        "else the prompts go in as plain text",
                                  switches={"no_chat_template": False})
    device: str = setting("auto", "training device: auto (accelerate's choice), cpu, cuda")
    gradient_checkpointing: bool = setting(False, "recompute activations to save memory")
    save_every: int = setting(10, "checkpoint every N steps")
    save_total_limit: int | None = setting(None, "keep only the newest N step checkpoints, deleting older ones once a "
                                                 "newer one is written (TRL's name and meaning); none keeps all; the "
                                                 "tracker's metrics keep the whole density curve either way")
    output_dir: str = setting("checkpoints/run", "the run folder")
    resume: bool = setting(False, "continue the run in --output_dir from its newest checkpoint")
    wandb: str | None = setting(None, "also log to this Weights & Biases project (works with WANDB_MODE=offline)",
                                metavar="PROJECT")
    seed: int = setting(0, "seed of prompt order, sampling and new heads; tiny models keep one init")
    atol: float = setting(1e-5, "tracker's absolute rule: changed if |Δ| > atol")
    eta: float = setting(1e-3, "tracker's relative rule: changed if |Δ| > eta·max(|w|, |w'|)")
    topk: int = setting(3, "k of the top-k block concentration")
    aspg_sparsity: float | None = setting(None, "--optimizer aspg: share of entries NOT updated at each step after the "
                                                f"warm-up, the global top 1 - this are; none: {ASPG_SPARSITY} (never "
                                                "with aspg_plan)")
    aspg_update_fraction: float | None = setting(None, "--optimizer aspg_plan: share of entries updated at each step "
                                                       "after the warm-up, the plan's 'sparsity'; none: "
                                                       f"{PLAN_UPDATE_FRACTION} (never with aspg)")
    aspg_warmup: int | None = setting(None, f"ASPG: dense steps before the sparse ones; none: {ASPG_WARMUP} for aspg, "
                                            f"{PLAN_WARMUP} for aspg_plan")
    allow_changed_settings: bool = setting(False, "with --resume: accept settings that differ from the run's (lr, "
                                                  "batch, seed, ...); each change is recorded in its run_config.json")

    def __post_init__(self) -> None:
        """The chosen ASPG variant's defaults filled in (runs recorded before aspg_plan existed hold
        aspg_sparsity 0.9 and aspg_warmup 10 whatever their optimizer: so does every non-plan run)."""
        plan = self.optimizer == "aspg_plan"
        if self.aspg_warmup is None:
            self.aspg_warmup = PLAN_WARMUP if plan else ASPG_WARMUP
        if self.aspg_sparsity is None and not plan:
            self.aspg_sparsity = ASPG_SPARSITY
        if self.aspg_update_fraction is None and plan:
            self.aspg_update_fraction = PLAN_UPDATE_FRACTION

    def require_counts(self, *flags: str) -> None:
        """Each named setting must be a count of at least 1."""
        if any(getattr(self, f) < 1 for f in flags):
            raise SubnetscopeError(", ".join(f"--{f}" for f in flags) + " must be at least 1")

    def require_numbers(self, *flags: str, positive: bool = False) -> None:
        """Each named setting must be a finite number >= 0 (> 0 with `positive`)."""
        for flag in flags:
            value = getattr(self, flag)
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                kind = "positive" if positive else "non-negative"
                raise SubnetscopeError(f"--{flag} must be a {kind} number (got {value})")

    def check_aspg(self) -> None:
        """Each ASPG variant takes its own share (never the other's: one counts entries NOT updated, the
        other entries updated), in range."""
        plan = self.optimizer == "aspg_plan"
        if plan and self.aspg_sparsity is not None:
            raise SubnetscopeError("--aspg_sparsity (the share of entries NOT updated) is for --optimizer aspg and "
                                   "does not combine with --optimizer aspg_plan or --aspg_update_fraction: aspg_plan "
                                   "takes --aspg_update_fraction (the share updated)")
        if not plan and self.aspg_update_fraction is not None:
            raise SubnetscopeError("--aspg_update_fraction (the share of entries updated) is for --optimizer aspg_plan "
                                   f"and does not combine with --optimizer {self.optimizer} or --aspg_sparsity (the "
                                   "share NOT updated): pass --optimizer aspg_plan without --aspg_sparsity")
        if plan and not 0.0 < self.aspg_update_fraction <= 1.0:
            raise SubnetscopeError(f"--aspg_update_fraction must be in (0, 1] (got {self.aspg_update_fraction})")
        if not plan and not 0.0 <= self.aspg_sparsity < 1.0:
            raise SubnetscopeError(f"--aspg_sparsity must be in [0, 1) (got {self.aspg_sparsity})")
        if self.aspg_warmup < 0:
            raise SubnetscopeError(f"--aspg_warmup must be >= 0 (got {self.aspg_warmup})")

    def validate(self) -> None:
        # changes.py loads torch: imported when a run is checked, not when its flags are parsed
        from .changes import ChangeRules

        self.require_counts("batch_size", "max_steps", "save_every", "max_prompt_tokens", "max_new_tokens", "topk")
        if self.save_total_limit is not None:
            self.require_counts("save_total_limit")
        self.require_numbers("lr", "temperature", positive=True)
        ChangeRules(self.atol, self.eta)
        if self.optimizer not in OPTIMIZERS:
            raise SubnetscopeError(f"--optimizer {self.optimizer!r}: use {', '.join(OPTIMIZERS)}")
        self.check_aspg()
        if self.precision not in PRECISIONS:
            raise SubnetscopeError(f"--precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.view_dtype is not None and self.view_dtype not in VIEW_DTYPE_NAMES:
            raise SubnetscopeError(f"--view_dtype {self.view_dtype!r}: use {', '.join(VIEW_DTYPE_NAMES)}")
        if self.precision == "bf16" and self.view_dtype not in (None, "bfloat16"):
            raise SubnetscopeError("--precision bf16 stores bf16 weights: --view_dtype must be bfloat16 (or left out)")


@dataclass
class RLConfig(RunConfig):
    """Settings of the RL loops (GRPO, PPO) beyond every run's."""

    weight_decay: float = setting(0.0, "decoupled (AdamW) or L2 (SGD, Adafactor) weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping; 0 = off")
    reward_device: str = setting("auto", "reward model's device (auto = the training device)")
    ref_device: str = setting("auto", "reference model's device (auto = the training device); cpu saves GPU memory")
    eval_every: int = setting(10, "held-out reward and KL every N steps")
    full_checkpoints: bool = setting(False, "write full safetensors per step instead of compact ones")
    update_mask: str | None = setting(
        None, "fine-tune only the subnetwork in this mask file (compute_masks.py; --from_run RUN gives a run's 'ever "
              "changed' mask): gradients masked, weights outside it held at θ0. A mask made from a run also writes "
              "subnetwork_comparison.json (identical weights vs that run, both final rewards). Tensors the mask does "
              "not cover stay at θ0 too", metavar="PATH")
    train_unmasked: bool = setting(False, "with --update_mask: also train the tensors the mask does not cover "
                                          "(embeddings, norms, biases of a compute_masks.py mask)")
    log_localization: bool = setting(True, "log per-block Gini / entropy / top-k every step",
                                  switches={"no_localization": False})
    no_tqdm: bool = setting(False, "no progress bar (for logs)")
    ddp_topk_density: float | None = setting(
        None, "several processes (torchrun / accelerate launch, DDP): each sends only this share of its gradient "
              "entries per bucket, the largest |grad + residual| as int32 index + value, the rest carried to the "
              "next step; logs comm/topk_bytes beside comm/dense_bytes; none: DDP's dense all-reduce")

    def validate(self) -> None:
        super().validate()
        self.require_counts("eval_every")
        self.require_numbers("weight_decay", "max_grad_norm")
        if self.optimizer == "aspg_plan" and self.weight_decay:
            raise SubnetscopeError("--optimizer aspg_plan is the research plan's plain top-k step, without weight "
                                   "decay: leave --weight_decay out, or use --optimizer aspg (AdamW's decoupled decay)")
        if self.ddp_topk_density is not None and not 0.0 < self.ddp_topk_density <= 1.0:
            raise SubnetscopeError(f"--ddp_topk_density must be in (0, 1] (got {self.ddp_topk_density})")
        if self.update_mask and not Path(self.update_mask).is_file():
            raise SubnetscopeError(f"--update_mask {self.update_mask} does not exist: pass a mask file written by "
                                   "compute_masks.py")
        if self.train_unmasked and not self.update_mask:
            raise SubnetscopeError("--train_unmasked only applies with --update_mask: pass a mask or leave it out")

    def uses_reference(self) -> bool:
        """Whether the loop needs the frozen reference model (its KL penalty and eval/*/kl)."""
        return True


@dataclass
class GRPOConfig(RLConfig):
    """GRPO's settings (subnetscope.grpo; TRL's loss_type="grpo")."""

    group_size: int = setting(4, "completions per prompt, at least 2 (TRL's num_generations)",
                              aliases=("num_generations",))
    inner_epochs: int = setting(1, "optimizer steps per rollout batch (TRL's num_iterations)",
                                aliases=("num_iterations",))
    beta: float = setting(0.04, "KL penalty weight, k3 estimator; 0 = no reference model")
    epsilon: float = setting(0.2, "ratio clipping range")
    kl_correction: bool = setting(True, "weight the k3 KL by the importance ratio, as TRL's use_bias_correction_kl; "
                                        "else plain k3", switches={"no_kl_correction": False})
    adv_clip: float = setting(5.0, "advantages are clipped to ±this")
    output_dir: str = "checkpoints/grpo"

    def validate(self) -> None:
        super().validate()
        if self.group_size < 2:
            raise SubnetscopeError("--group_size must be at least 2: GRPO compares completions within a group")
        self.require_counts("inner_epochs")
        self.require_numbers("beta", "epsilon", "adv_clip")

    def uses_reference(self) -> bool:
        return self.beta != 0.0


@dataclass
class PPOConfig(RLConfig):
    """PPO's settings (subnetscope.ppo)."""

    # defaults of the original experiment config (subnetscope.ppo's docstring)
    policy: str = "gpt2-medium"
    batch_size: int = 32
    max_steps: int = 600
    save_every: int = 20
    eval_every: int = 20
    topk: int = 3
    log_localization: bool = True
    lr: float = 1.41e-5
    gamma: float = setting(1.0, "discount")
    lam: float = setting(0.95, "GAE lambda")
    cliprange: float = setting(0.2, "policy ratio clipping")
    cliprange_value: float = setting(0.2, "value clipping around the rollout's values")
    vf_coef: float = setting(0.1, "weight of the value loss")
    init_kl_coef: float = setting(0.2, "KL penalty coefficient at the start")
    target_kl: float | None = setting(6.0, "adaptive KL controller's target; none keeps the KL coefficient at "
                                           "--init_kl_coef", switches={"fixed_kl": None})
    horizon: int = setting(10000, "adaptive controller's horizon in samples")
    ppo_epochs: int = setting(4, "passes over each rollout batch")
    mini_batch_size: int = setting(8, "prompts per optimizer step, per process")
    whiten_advantages: bool = setting(True, "whiten the GAE advantages (else the raw ones)",
                                      switches={"no_whiten": False})
    output_dir: str = "checkpoints/ppo"

    def validate(self) -> None:
        super().validate()
        self.require_counts("ppo_epochs", "mini_batch_size", "horizon")
        for flag in ("gamma", "lam"):
            if not 0 <= getattr(self, flag) <= 1:
                raise SubnetscopeError(f"--{flag} must lie in [0, 1]")
        self.require_numbers("cliprange", "cliprange_value", "vf_coef", "init_kl_coef")
        if self.target_kl is not None and self.target_kl <= 0:
            raise SubnetscopeError("--target_kl must be positive (leave it out for a fixed KL coefficient)")


@dataclass
class BaselineConfig(RunConfig):
    """The SFT and DPO baselines' settings (subnetscope.baselines, TRL's trainers)."""

    task: str = setting("sft", "which baseline: SFTTrainer on the best samples, or DPOTrainer on best vs worst",
                        choices=("sft", "dpo"))
    candidates: int = setting(4, "samples of the initial policy per prompt, ranked by the reward")
    max_prompts: int = setting(256, "prompts used to build the data set")
    dpo_beta: float = setting(0.1, "DPO's beta")
    sft_data: str = setting("samples", "SFT targets: the best of --candidates samples (samples), real positive "
                                       "reviews of a labelled --dataset (positive_reviews: opening = prompt, what "
                                       "follows = completion), or the prompt/completion pairs of a local --dataset "
                                       "file (completions)", choices=SFT_DATA)
    min_reward: float | None = setting(None, "--sft_data samples: keep only prompts whose best sample scores at least "
                                             "this (rejection-sampling fine-tuning); none keeps every prompt's best")
    optimizer: str = setting("adamw", "TRL's optimizer (its `optim`)", choices=tuple(TRL_OPTIMIZERS))
    output_dir: str = "checkpoints/sft"

    def validate(self) -> None:
        super().validate()
        if self.task not in ("sft", "dpo"):
            raise SubnetscopeError(f"--task {self.task!r}: use sft or dpo")
        if self.optimizer not in TRL_OPTIMIZERS:
            raise SubnetscopeError(f"--optimizer {self.optimizer!r}: TRL's trainers here take "
                                   f"{', '.join(TRL_OPTIMIZERS)}")
        if self.sft_data not in SFT_DATA:
            raise SubnetscopeError(f"--sft_data {self.sft_data!r}: use {' or '.join(SFT_DATA)}")
        if self.candidates < 2:
            raise SubnetscopeError("--candidates must be at least 2: the best (and worst) of them are kept")
        self.require_counts("max_prompts")
        if self.min_reward is not None and (self.task != "sft" or self.sft_data != "samples"):
            raise SubnetscopeError("--min_reward filters the policy's own samples: use it with --task sft and "
                                   "--sft_data samples")


def add_precision_args(group: argparse._ActionsContainer, default: str) -> None:
    """`--precision` and `--view_dtype` for commands whose settings are not a RunConfig, explained by
    RunConfig's fields."""
    meta = RunConfig.__dataclass_fields__
    group.add_argument("--precision", choices=PRECISIONS,
                       help=f"{meta['precision'].metadata['help']} (default {default})")
    group.add_argument("--view_dtype", choices=VIEW_DTYPE_NAMES, help=f"{meta['view_dtype'].metadata['help']}")


def check_prune_schedule(target: float, warmup_ratio: float, final_prune_ratio: float, applications: int,
                         ramp: str) -> None:
    """The pruning schedule's settings that need no step count (subnetscope.pruning.PruneSchedule checks the
    rest): refused before the text is tokenized."""
    if not 0.0 <= target < 1.0:
        raise SubnetscopeError(f"target_sparsity {target}: must be in [0, 1)")
    if ramp not in RAMPS:
        raise SubnetscopeError(f"ramp {ramp!r}: use linear or cubic")
    if applications < 1:
        raise SubnetscopeError(f"prune_applications {applications}: needs at least 1")
    if not 0.0 <= warmup_ratio < final_prune_ratio <= 1.0:
        raise SubnetscopeError(
            f"warmup_ratio {warmup_ratio} and final_prune_ratio {final_prune_ratio} leave no pruning "
            "window: need 0 <= warmup_ratio < final_prune_ratio <= 1"
        )


@dataclass
class PruneConfig:
    """Every setting of a pruning run (main_prune.py, subnetscope.prune_trainer); each is a flag and a YAML key."""

    data: str = setting(DEFAULT_TEXT, "plain text to train on (../shared/data/tinyshakespeare/input.txt beside the "
                                      "repository)")
    tokenizer: str = setting("gpt2", "tokenizer Hub id or folder (offline ../shared/models/tiny-gpt2 has GPT-2's)")
    n_layer: int = setting(6, "transformer blocks")
    n_head: int = setting(6, "attention heads")
    n_embd: int = setting(384, "width")
    block_size: int = setting(256, "context length in tokens")
    batch_size: int = setting(32, "windows per step")
    epochs: int = setting(10, "passes over the training tokens; steps = epochs x (train tokens // (batch_size x "
                              "block_size))")
    lr: float = setting(6e-4, "AdamW learning rate")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    val_fraction: float = setting(0.1, "share of the text, from its end, held out for validation")
    target_sparsity: float = setting(0.5, "sparsity of the linear weights at the last application and, with "
                                          "hold_final, of the final model, in [0, 1)")
    warmup_ratio: float = setting(0.15, "share of the steps before the pruning window opens; the first pruning comes "
                                        "one interval later, at step round(T x (warmup_ratio + (final_prune_ratio - "
                                        "warmup_ratio) / prune_applications)) of T steps (the run prints the steps)")
    final_prune_ratio: float = setting(0.85, "share of the steps at which the last pruning reaches the target; the "
                                             "finalization phase follows")
    prune_applications: int = setting(10, "prunings, evenly spaced in the window, the last at its end")
    ramp: str = setting("linear", "how the level rises: linear, or cubic (Zhu & Gupta)")
    hard_mask: bool = setting(False, "keep pruned weights at zero after every step from the first pruning on, for "
                                     "contrast (else free to revive between prunings)")
    hold_final: bool = setting(True, "hold the mask through the finalization phase (after the last pruning), so the "
                                     "final model has the target sparsity (--no-hold_final lets pruned weights "
                                     "revive to the end)")
    log_every: int = setting(10, "steps between metric records (application steps are always recorded)")
    eval_every: int = setting(50, "steps between validation losses")
    eval_batches: int = setting(8, "validation batches per evaluation")
    save_every: int = setting(100, "steps between checkpoints")
    rank_metrics: bool = setting(True, "effective rank of every matrix at each record (one SVD each)")
    device: str = setting("auto", "auto, cpu or cuda (bf16 autocast on a GPU)")
    seed: int = setting(0, "seed of the initial weights and of the batches")
    output_dir: str = setting("checkpoints/prune", "the run folder")
    resume: bool = same_setting(RunConfig, "resume")
    wandb: str | None = same_setting(RunConfig, "wandb")
    no_tqdm: bool = same_setting(RLConfig, "no_tqdm")

    def validate(self) -> None:
        """Every check that needs no tokens, so that a refusal comes before torch is imported."""
        check_at_least_one(self, ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "epochs", "log_every",
                                  "eval_every", "eval_batches", "save_every"), prefix="")
        if self.n_embd % self.n_head:
            raise SubnetscopeError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if not 0.0 < self.val_fraction < 1.0:
            raise SubnetscopeError(f"val_fraction {self.val_fraction}: must be in (0, 1)")
        if self.lr <= 0:
            raise SubnetscopeError(f"lr {self.lr}: must be positive")
        check_prune_schedule(self.target_sparsity, self.warmup_ratio, self.final_prune_ratio,
                             self.prune_applications, self.ramp)
        if not Path(self.data).is_file():
            raise SubnetscopeError(f"{self.data} does not exist: pass data: PATH (a plain text file, e.g. Tiny "
                                   f"Shakespeare from {TINY_SHAKESPEARE_URL})")


@dataclass
class SparseFTConfig:
    """Every setting of a sparse fine-tuning run (main_sparse_ft.py, subnetscope.sparse_ft); each is a flag and a
    YAML key."""

    policy: str = setting("tiny-gpt2", "model to fine-tune: a save_pretrained folder, a Hub id, or tiny-gpt2 / "
                                       "tiny-gemma3n")
    tokenizer: str | None = setting(None, "tokenizer for models without one (none: the model's own)")
    task: str = setting("imdb", "boolq, hellaswag, gsm8k or imdb (through datasets), or a local json/jsonl/csv/txt "
                                "file: with BoolQ's, HellaSwag's or GSM8K's columns it is that task, else plain text "
                                "such as ../shared/data/imdb/train.jsonl.gz")
    eval_data: str | None = setting(None, "records the final model's task metric is computed on: a local "
                                          "json/jsonl/csv file with the task's columns (none: a named task's "
                                          "validation split, test for gsm8k; a local task file's held-out records; "
                                          "plain text has no task metric)")
    eval_examples: int = setting(500, "records scored for the task metric")
    eval_max_new_tokens: int = setting(256, "greedy tokens generated per GSM8K answer")
    mask: str | None = setting(None, "mask file from compute_masks.py (True = kept); none = dense")
    method: str = setting("masked", "masked: train the weights themselves, pruned entries held at zero; lora: PEFT "
                                    "LoRA adapters", choices=SPARSE_FT_METHODS)
    lora_mode: str = setting("sparse_to_dense", "sparse_to_dense: dense adapters, mask applied at the merge; "
                                                "sparse_to_sparse: the adapter's delta masked in the forward too, so "
                                                "the merged model is sparse at every step", choices=LORA_MODES)
    lora_rank: int = setting(8, "LoRA rank r")
    lora_alpha: float = setting(16.0, "LoRA alpha; the delta is scaled by alpha / r")
    lora_dropout: float = setting(0.0, "dropout on the LoRA input")
    seq_len: int = setting(128, "tokens per training sequence")
    batch_size: int = setting(8, "sequences per step")
    max_steps: int = setting(100, "optimizer steps")
    lr: float = setting(1e-4, "AdamW learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay (pruned entries stay zero either way)")
    precision: str = same_setting(RunConfig, "precision")
    view_dtype: str | None = same_setting(RunConfig, "view_dtype")
    max_texts: int = setting(20000, "texts read from the task")
    val_fraction: float = setting(0.05, "share of the texts held out for validation")
    log_every: int = setting(10, "steps between records of loss and samples/s")
    eval_every: int = setting(50, "steps between validation losses")
    eval_batches: int = setting(4, "validation batches per evaluation")
    save_every: int = setting(50, "steps between checkpoints")
    device: str = setting("auto", "auto, cpu or cuda")
    seed: int = setting(0, "seed of the batches and the adapters' initialisation")
    output_dir: str = setting("checkpoints/sparse_ft", "the run folder")
    resume: bool = same_setting(RunConfig, "resume")
    wandb: str | None = same_setting(RunConfig, "wandb")
    no_tqdm: bool = same_setting(RLConfig, "no_tqdm")

    def validate(self) -> None:
        """Every check that needs neither the model nor the task, so that a refusal comes before torch is
        imported (the mask file is not checked here: a sweep validates its runs before their masks exist)."""
        check_at_least_one(self, ("lora_rank", "seq_len", "batch_size", "max_steps", "max_texts", "log_every",
                                  "eval_every", "eval_batches", "save_every", "eval_examples", "eval_max_new_tokens"))
        if self.method not in SPARSE_FT_METHODS:
            raise SubnetscopeError(f"--method {self.method!r}: use masked or lora")
        if self.lora_mode not in LORA_MODES:
            raise SubnetscopeError(f"--lora_mode {self.lora_mode!r}: use {' or '.join(LORA_MODES)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise SubnetscopeError("--lr must be positive and --weight_decay non-negative")
        if not 0.0 < self.val_fraction < 1.0:
            raise SubnetscopeError(f"--val_fraction {self.val_fraction}: must be in (0, 1)")
        if self.precision not in PRECISIONS:
            raise SubnetscopeError(f"--precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.view_dtype is not None and self.view_dtype not in VIEW_DTYPE_NAMES:
            raise SubnetscopeError(f"--view_dtype {self.view_dtype!r}: use {', '.join(VIEW_DTYPE_NAMES)}")
        if self.eval_data and not Path(self.eval_data).expanduser().is_file():
            raise SubnetscopeError(f"--eval_data {self.eval_data} does not exist: pass a local json/jsonl/csv file "
                                   "with the task's columns")


@dataclass
class TestbedConfig:
    """Every setting of a testbed build (testbed.py build, subnetscope.testbed); each is a flag and a YAML key."""

    data: str = setting("imdb", "IMDB reviews with labels: imdb (through datasets) or a local file such as "
                                "../shared/data/imdb/train.jsonl.gz")
    tokenizer: str = setting("gpt2", "GPT-2 tokenizer: gpt2 from the Hub, offline ../shared/models/tiny-gpt2 (it has "
                                     "GPT-2's)")
    n_layer: int = setting(6, "policy transformer blocks")
    n_head: int = setting(6, "attention heads")
    n_embd: int = setting(384, "width")
    block_size: int = setting(256, "context length in tokens (pretraining windows, classifier inputs)")
    lm_steps: int = setting(2000, "pretraining steps")
    lm_batch_size: int = setting(64, "windows per pretraining step")
    lm_lr: float = setting(6e-4, "peak pretraining lr (cosine)")
    clf_steps: int = setting(600, "classifier training steps")
    clf_batch_size: int = setting(32, "reviews per classifier step")
    clf_lr: float = setting(2e-4, "classifier lr")
    max_reviews: int = setting(25000, "reviews read from the data")
    heldout_reviews: int = setting(1000, "of those, held out for perplexity and accuracy")
    device: str = setting("auto", "auto, cpu or cuda")
    seed: int = setting(0, "seed of the data order, initial weights and batches")
    output_dir: str = setting("checkpoints/testbed", "the testbed folder")

    def validate(self) -> None:
        check_at_least_one(self, ("n_layer", "n_head", "n_embd", "block_size", "lm_steps", "lm_batch_size",
                                  "clf_steps", "clf_batch_size", "max_reviews", "heldout_reviews"))
        if self.n_embd % self.n_head:
            raise SubnetscopeError(f"--n_embd {self.n_embd} is not divisible by --n_head {self.n_head}")
        if self.heldout_reviews >= self.max_reviews:
            raise SubnetscopeError("--heldout_reviews must be smaller than --max_reviews")


@dataclass
class StudyConfig:
    """Every setting of the RL-sparsity study on a testbed (testbed.py study, subnetscope.study); each is a flag
    and a YAML key."""

    testbed: str = setting("checkpoints/testbed", "the built testbed")
    algos: list[str] = setting(list(STUDY_ALGOS), "algorithms", choices=tuple(STUDY_ALGOS))
    seeds: list[int] = setting([0, 1, 2], "seeds")
    max_steps: int = setting(40, "updates of every run")
    lr: float = setting(1e-5, "learning rate of every run")
    batch_size: int = setting(16, "prompts per update")
    max_prompt_tokens: int = setting(16, "prompt length (review opening)")
    max_new_tokens: int = setting(24, "completion length")
    device: str = setting("auto", "auto, cpu or cuda")
    precision: str = setting("auto", "how every main run keeps and computes its weights: mixed (fp32 masters, bf16 "
                                     "autocast, judged and saved as bf16), bf16, fp32, or auto: mixed on a CUDA GPU "
                                     "and fp32 elsewhere", choices=PRECISIONS)
    view_dtype: str | None = setting(None, "dtype at which every main run's changes are judged; none: bfloat16 "
                                           "under mixed and bf16, float32 under fp32", choices=VIEW_DTYPE_NAMES)
    output_dir: str = setting("checkpoints/study", "study folder")
    subnetwork: bool = setting(True, "the subnetwork-only GRPO rerun (confined to the weights the full run changed)",
                               switches={"no_subnetwork": False})
    precision_split: bool = setting(True, "the precision split: GRPO under mixed precision, unless the main runs "
                                          "were, and with pure bf16 weights", switches={"no_precision_split": False})

    def validate(self) -> None:
        unknown = [a for a in self.algos if a not in STUDY_ALGOS]
        if unknown:
            raise SubnetscopeError(f"--algos {' '.join(unknown)}: choose from {', '.join(STUDY_ALGOS)}")
        for d in ("policy", "reward"):
            if not (Path(self.testbed) / d / "config.json").is_file():
                raise SubnetscopeError(f"{self.testbed}/{d} is missing: build the testbed first "
                                       f"(python testbed.py build --output_dir {self.testbed})")
        if self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise SubnetscopeError("--max_steps and --batch_size must be at least 1 and --lr positive")
