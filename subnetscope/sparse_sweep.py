"""The sparse fine-tuning guide's experiment as one resumable sweep: masks → sparse fine-tuning → analysis.

    output_dir: checkpoints/sparse_sweep
    policy: gpt2
    sparsity: [0.5, 0.7, 0.9]          # mask levels; every level of every mask setting is fine-tuned
    dense: true                        # also one dense (unmasked) run per training setting: the reference
    masks: {method: unstructured, importance: [magnitude, wanda], group: row, calib_data: imdb}
    train: {task: boolq, method: [masked, lora], lora_mode: sparse_to_sparse, max_steps: 500, seed: [0, 1, 2]}

`masks` holds compute_masks.py flags, `train` main_sparse_ft.py settings; a list is a grid axis (except
compute_masks' --include, a list of tensors). `policy`, `tokenizer` and `device` go to both. Everything
is checked before anything runs. Then, under output_dir: masks/<setting>/ (compute_masks.py's output;
skipped when its files exist), runs/<run>/ (each a main_sparse_ft.py run in its own process, so its
peak memory is its own; a finished run is skipped, a half-done one resumed; its settings in
runs/<run>.yaml, its output in runs/<run>.log), and analysis/ (prune_report.py's tables and figures,
plus sweep_summary.csv: per run its mask, sparsity, validation loss, task metric, violations of the
mask in final/, wall time and peak memory; sweep_grouped.csv: mean and std over seeds).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from .checkpoint import atomic_write_file, open_checkpoint
from .config import SparseFTConfig
from .errors import SubnetscopeError, refuse_renamed
from .masks import load_masks
from .outputs import check_output_dir
from .report import write_csv, write_json
from .stats import mean_and_sd

TOP_KEYS = {"output_dir", "policy", "tokenizer", "device", "sparsity", "dense", "masks", "train"}
SHARED = ("policy", "tokenizer", "device")  # settings of both compute_masks.py and main_sparse_ft.py
MASK_MANAGED = {"policy", "from_run", "output_dir", "sparsity", "plot", "tokenizer", "device"}
TRAIN_MANAGED = {"policy", "tokenizer", "device", "mask", "output_dir", "resume", "no_tqdm"}
MEASURES = ("val_loss", "task_score", "final_sparsity", "wall_seconds", "peak_gpu_memory_gb", "peak_cpu_rss_gb")


@dataclass
class MaskSetting:
    """One compute_masks.py call: its folder and flags, and the mask file of each sparsity level."""

    tag: str
    folder: Path
    argv: list[str]
    files: dict[float, Path]


@dataclass
class SweepRun:
    name: str
    settings: dict  # main_sparse_ft.py settings, output_dir and mask included
    mask: MaskSetting | None
    sparsity: float
    axes: dict


def _slug(axes: dict) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(f"{k}={v}" for k, v in axes.items()))


def _grid(section: dict, scalar_lists: tuple[str, ...] = ()) -> list[dict]:
    """Every combination of a section's list values (its grid axes), each as {axis: value}."""
    axes = {k: v for k, v in section.items() if isinstance(v, list) and k not in scalar_lists}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _flag_args(settings: dict) -> list[str]:
    argv = []
    for key, value in settings.items():
        if isinstance(value, bool):
            argv.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def _mask_settings(sweep: dict, levels: list[float], out: Path) -> list[MaskSetting]:
    """Each mask setting's compute_masks.py call, its flags parsed by compute_masks.py's own parser."""
    from .cli.compute_masks import build_parser, mask_name, parse_nm

    section = sweep.get("masks") or {}
    if not isinstance(section, dict):
        raise SubnetscopeError("sweep: masks must be a mapping of compute_masks.py flags")
    parser = build_parser()
    known = set(vars(parser.parse_args(["--policy", "m"]))) - MASK_MANAGED
    unknown = sorted(set(section) - known)
    if unknown:
        raise SubnetscopeError(f"sweep: masks: {', '.join(unknown)} is not a compute_masks.py setting here; "
                               f"use {', '.join(sorted(known))}")
    parser.exit_on_error = False
    out_settings = []
    for axes in _grid(section, ("include",)):
        flags = {**section, **axes}
        shared = _flag_args({k: sweep[k] for k in SHARED if k in sweep})
        argv = [*shared, *_flag_args(flags)]
        try:
            args, extra = parser.parse_known_args(argv)
        except argparse.ArgumentError as err:
            raise SubnetscopeError(f"sweep: masks: {err}") from None
        if extra:
            raise SubnetscopeError(f"sweep: masks: compute_masks.py does not take {' '.join(extra)}")
        nm = parse_nm(args.nm)
        tag = _slug(axes) or "masks"
        folder = out / "masks" / tag
        steps = [1 - nm[0] / nm[1]] if args.method == "nm" else levels
        files = {s: folder / mask_name(args.method, args.importance, args.group, s, nm) for s in steps}
        level_args = [] if args.method == "nm" else ["--sparsity", *map(str, levels)]
        out_settings.append(MaskSetting(tag, folder, [*argv, *level_args, "--output_dir", str(folder), "--no-plot"],
                                        files))
    return out_settings


def _train_settings(sweep: dict) -> tuple[dict, list[dict]]:
    """The training section's fixed settings and its grid combinations, keys checked."""
    section = sweep.get("train") or {}
    if not isinstance(section, dict):
        raise SubnetscopeError("sweep: train must be a mapping of main_sparse_ft.py settings")
    known = {f.name for f in fields(SparseFTConfig)} - TRAIN_MANAGED
    unknown = sorted(set(section) - known)
    if "dtype" in unknown:
        raise SubnetscopeError("sweep: train: dtype was replaced by precision (auto, mixed, bf16 or fp32) and "
                               "view_dtype")
    if unknown:
        raise SubnetscopeError(f"sweep: train: {', '.join(unknown)} is not a main_sparse_ft.py setting here; "
                               f"use {', '.join(sorted(known))}")
    fixed = {k: _typed(k, v) for k, v in section.items() if not isinstance(v, list)}
    return fixed, [{k: _typed(k, v) for k, v in axes.items()} for axes in _grid(section)]


def _typed(key: str, value):
    """A training setting as its field's type (YAML's 1e-4 is a string), or one line naming it."""
    kind = typing.get_type_hints(SparseFTConfig)[key]
    allowed = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
    if value is None and type(None) in typing.get_args(kind):
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t in (int, float) and not isinstance(value, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if t is float or number == int(number):
                return t(number)
        if t is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    expected = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise SubnetscopeError(f"sweep: train: {key}={value!r} is not a valid value (expected {expected})")


def _levels(sweep: dict) -> list[float]:
    levels = sweep.get("sparsity", [0.5])
    levels = levels if isinstance(levels, list) else [levels]
    bad = [s for s in levels if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0]
    if bad or not levels:
        raise SubnetscopeError(f"sweep: sparsity {bad[0] if bad else levels!r}: every level must be a number in [0, 1)")
    return [float(s) for s in levels]


def _mask_labels(masks: list[MaskSetting]) -> dict[Path, str]:
    """A run's name for its mask: the mask file's name (unstructured_magnitude_matrix_s0.50), with its
    setting's folder in front where two settings make files of the same name."""
    stems = [f.stem.removeprefix("mask_") for m in masks for f in m.files.values()]
    clash = {s for s in stems if stems.count(s) > 1}
    return {f: (f"{m.tag}__" if f.stem.removeprefix("mask_") in clash else "") + f.stem.removeprefix("mask_")
            for m in masks for f in m.files.values()}


def expand_sweep(sweep: dict, out: Path) -> tuple[list[MaskSetting], list[SweepRun]]:
    """Every mask setting and every fine-tuning run of a sweep, each run's settings checked by
    SparseFTConfig.validate(); nothing is written."""
    if not isinstance(sweep, dict):
        raise SubnetscopeError(f"sweep: the file must be a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    unknown = sorted(set(sweep) - TOP_KEYS)
    refuse_renamed(unknown, TOP_KEYS, keys=True, where="sweep: ")
    if unknown:
        raise SubnetscopeError(f"sweep: unknown top-level key(s) {', '.join(unknown)}; "
                               f"use {', '.join(sorted(TOP_KEYS))}")
    if not isinstance(sweep.get("policy"), str):
        raise SubnetscopeError("sweep: policy is required: a model folder, a Hub id, or tiny-gpt2")
    masks = _mask_settings(sweep, _levels(sweep), out)
    fixed, combos = _train_settings(sweep)
    shared = {k: sweep[k] for k in SHARED if k in sweep}
    runs = []
    labels = _mask_labels(masks)
    for axes in combos:
        cases = [(m, s, f) for m in masks for s, f in m.files.items()]
        cases += [(None, 0.0, None)] if sweep.get("dense", True) else []
        for mask, level, file in cases:
            name = "__".join(filter(None, ["dense" if file is None else labels[file], _slug(axes)]))
            settings = {**fixed, **axes, **shared, "mask": None if file is None else str(file),
                        "output_dir": str(out / "runs" / name)}
            try:
                SparseFTConfig(**settings).validate()
            except SubnetscopeError as err:
                raise SubnetscopeError(f"sweep: run {name}: {err}") from None
            runs.append(SweepRun(name, settings, mask, level, axes))
    if len({r.name for r in runs}) != len(runs):
        raise SubnetscopeError("sweep: two runs have the same settings; remove the duplicate grid values")
    return masks, runs


def load_sweep(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SubnetscopeError(f"{path} does not exist: pass a sweep file (.yaml)")
    try:
        return yaml.safe_load(file.read_text())
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise SubnetscopeError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def _make_masks(setting: MaskSetting) -> str | None:
    """compute_masks.py for one setting unless its files exist; its error line, or None."""
    from .cli.compute_masks import main as compute_masks

    if all(f.is_file() for f in setting.files.values()):
        return None
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            compute_masks(setting.argv)
    except SystemExit as stop:
        if stop.code:
            lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
            return lines[-1] if lines else f"compute_masks.py exited {stop.code}"
    missing = [f.name for f in setting.files.values() if not f.is_file()]
    return f"compute_masks.py wrote no {', '.join(missing)}" if missing else None


def _train(run: SweepRun) -> str | None:
    """One main_sparse_ft.py run in its own process (resumed when started before); its error line, or None."""
    import yaml

    folder = Path(run.settings["output_dir"])
    config = folder.parent / f"{run.name}.yaml"
    atomic_write_file(config, lambda tmp: tmp.write_text(yaml.safe_dump(run.settings, sort_keys=False)))
    argv = [sys.executable, "-m", "subnetscope.cli.sparse_ft", "--config", str(config), "--no_tqdm"]
    argv += ["--resume"] if (folder / "metrics.jsonl").is_file() else []
    log = folder.parent / f"{run.name}.log"
    with open(log, "w") as fh:
        code = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, check=False).returncode
    if code == 0:
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [f"exited {code}"])[-1] + f" (see {log})"


def _row(run: SweepRun, error: str | None) -> dict:
    folder = Path(run.settings["output_dir"])
    row = {"run": run.name, "mask": run.mask.tag if run.mask else "dense", "sparsity": run.sparsity, **run.axes,
           "status": "failed" if error else "ok", "error": error}
    summary = folder / "summary.json"
    if error is None and summary.is_file():
        data = json.loads(summary.read_text())
        row.update({k: data.get(k) for k in ("task_metric", *MEASURES)})
        if run.settings["mask"]:
            from .cli.check_mask import sparsity_report

            report = sparsity_report(open_checkpoint(str(folder / "final")), load_masks(run.settings["mask"]).masks)
            row["mask_violations"] = report["overall"]["violations"]
    return row


def grouped(rows: list[dict]) -> list[dict]:
    """Mean and sample std over seeds of each mask, sparsity and training setting."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            key = tuple((k, json.dumps(v)) for k, v in row.items()
                        if k not in (*MEASURES, "run", "seed", "status", "error", "mask_violations"))
            groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        entry = {k: json.loads(v) for k, v in key}
        entry["seeds"] = len(members)
        for m in MEASURES:
            entry[f"{m}_mean"], entry[f"{m}_std"] = mean_and_sd([r.get(m) for r in members])
        out.append(entry)
    return out


@dataclass(frozen=True)
class SweepResult:
    out: Path
    runs: int
    failed: list[str]


def run_sweep(path: str, output_dir: str | None = None, log=print) -> SweepResult:
    """Masks, then every fine-tuning run, then the analysis; resumable. The file is checked first."""
    sweep = load_sweep(path)
    target = output_dir or (sweep.get("output_dir") if isinstance(sweep, dict) else None) or "checkpoints/sparse_sweep"
    out = check_output_dir(target, "--output_dir" if output_dir else f"{path}: output_dir")
    masks, runs = expand_sweep(sweep, out)
    mask_errors = {}
    for setting in masks:
        log(f"masks {setting.tag}: {'found' if all(f.is_file() for f in setting.files.values()) else 'computing'}")
        mask_errors[setting.tag] = _make_masks(setting)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, run in enumerate(runs, 1):
        done = Path(run.settings["output_dir"]) / "summary.json"
        error = mask_errors.get(run.mask.tag) if run.mask else None
        if error:
            error = f"masks {run.mask.tag}: {error}"
        elif done.is_file():
            log(f"[{i}/{len(runs)}] {run.name}: done before, skipped")
        else:
            log(f"[{i}/{len(runs)}] {run.name}: training")
            error = _train(run)
        if error:
            log(f"[{i}/{len(runs)}] {run.name}: failed: {error}")
        rows.append(_row(run, error))
    analyze(rows, out)
    return SweepResult(out, len(rows), [r["run"] for r in rows if r["status"] != "ok"])


def analyze(rows: list[dict], out: Path) -> None:
    """sweep_summary.csv, sweep_grouped.csv and prune_report.py's tables and figures in out/analysis."""
    from .cli.prune_report import main as prune_report

    analysis = out / "analysis"
    write_csv(analysis / "sweep_summary.csv", rows)
    write_csv(analysis / "sweep_grouped.csv", grouped(rows))
    write_json(analysis / "sweep_summary.json", {"runs": rows})
    if any(r["status"] == "ok" for r in rows):
        with contextlib.redirect_stdout(io.StringIO()):
            prune_report(["--results_dir", str(out / "runs"), "--output_dir", str(analysis)])
