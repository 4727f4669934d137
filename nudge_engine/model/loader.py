"""Loads safetensors weights from a local Hugging Face folder (or a .gguf file, see gguf_checkpoint.py),
tensor by tensor, into a CausalLM.

Every check that can fail runs on the files' headers and a meta-device model before any real
allocation: pickle weights, git-lfs pointers, truncated or corrupt files, missing, unexpected and
misshapen tensors each get an error naming the file and tensor.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from .config import ModelConfig, load_config
from .errors import ModelFolderError
from .gguf_checkpoint import is_gguf
from .limits import check_memory
from .families import CausalLM, build_model
from ..layers.parallel import SINGLE, TensorParallel, building

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LFS_POINTER_PREFIX = b"version https://git-lfs"
HEADER_SIZE_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_LISTED_ERRORS = 8     # tensor problems named in one error; the rest are counted
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(HEADER_SIZE_BYTES)
        if head.startswith(LFS_POINTER_PREFIX[:HEADER_SIZE_BYTES]) and (head + f.read(64)).startswith(LFS_POINTER_PREFIX):
            raise ModelFolderError(f"{path}: is a git-lfs pointer file, not weights (run `git lfs pull` in the model folder)")
        if len(head) < HEADER_SIZE_BYTES:
            raise ModelFolderError(f"{path}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(MAX_HEADER_BYTES, size - HEADER_SIZE_BYTES):
            raise ModelFolderError(f"{path}: corrupt or truncated safetensors header (length {header_len}, file {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFolderError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - HEADER_SIZE_BYTES - header_len
    tensors, spans = {}, []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(offset) for offset in meta["data_offsets"])
            shape = tuple(int(d) for d in meta["shape"])
            dtype = meta["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ModelFolderError(f"{path}: corrupt safetensors entry for tensor {name!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelFolderError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if not 0 <= start <= end or end - start != nbytes:
            raise ModelFolderError(
                f"{path}: corrupt safetensors entry for tensor {name!r}: {dtype} {list(shape)} needs {nbytes} bytes, "
                f"its offsets [{start}, {end}) hold {end - start}"
            )
        if end > data_size:
            raise ModelFolderError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section, which has only {data_size}"
            )
        tensors[name] = TensorInfo(path, shape)
        spans.append((start, end, name))
    # safetensors refuses gaps, overlaps and trailing bytes, but only once the model is allocated: refuse them here.
    covered = 0
    for start, end, name in sorted(spans):
        if start != covered:
            raise ModelFolderError(
                f"{path}: corrupt safetensors file: tensor {name!r} starts at byte {start} of the data section, "
                f"expected {covered} (overlapping or gapped tensors)"
            )
        covered = end
    if covered != data_size:
        raise ModelFolderError(
            f"{path}: corrupt safetensors file: {data_size - covered} bytes after the last tensor's data"
        )
    return tensors


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelFolderError(f"{index}: corrupt index (expected a 'weight_map' object)") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFolderError(f"{index}: lists shards that are not in the folder: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelFolderError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); refused: safetensors only, since loading a pickle "
            "can run code. Convert the checkpoint to safetensors first."
        )
    raise ModelFolderError(f"{folder}: no *.safetensors weight files")


def _expected_params(model: CausalLM) -> dict[tuple[str, str | None], tuple[int, ...]]:
    """(parameter, shard) -> shape, from a meta-device model."""
    expected = {}
    for name, param in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        shards = getattr(param, "expected_shards", None)
        if shards is None:
            expected[(name, None)] = _checkpoint_shape(param, None, tuple(param.shape))
            continue
        for shard in shards:
            rows = module.shard_sizes[shard]
            expected[(name, shard)] = _checkpoint_shape(param, shard, (rows, *param.shape[1:]))
    return expected


def _checkpoint_shape(param, shard: str | None, local: tuple[int, ...]) -> tuple[int, ...]:
    """A tensor-parallel shard's parameter is a slice of the checkpoint's tensor (layers/parallel.py)."""
    cut = getattr(param, "checkpoint_slices", {}).get(shard)
    if cut is None:
        return local
    dim, _, _, full = cut
    return (*local[:dim], full, *local[dim + 1:])


def _narrowed(param, shard: str | None, tensor):
    """This rank's slice of a checkpoint tensor: `tensor` is a torch tensor or a safetensors slice,
    which then reads only the slice from the file."""
    cut = getattr(param, "checkpoint_slices", {}).get(shard)
    if cut is None:
        return tensor if isinstance(tensor, torch.Tensor) else tensor[:]
    dim, start, length, _ = cut
    return tensor[(slice(None),) * dim + (slice(start, start + length),)]


def _folder_tensors(folder: Path) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for path in weight_files(folder):
        for name, info in _read_header(path).items():
            if name in infos:
                raise ModelFolderError(f"tensor {name!r} appears in both {infos[name].file.name} and {path.name}")
            infos[name] = info
    return infos


def _gguf_tensors(path: Path) -> dict[str, TensorInfo]:
    from .gguf_checkpoint import tensor_shapes
    return {name: TensorInfo(path, shape) for name, (shape, _) in tensor_shapes(path).items()}


def _plan_loading(model: CausalLM, folder: Path) -> dict[str, tuple[str, str | None]]:
    """Checks names and shapes of every checkpoint tensor; returns checkpoint name -> (param, shard)."""
    infos = _gguf_tensors(folder) if is_gguf(folder) else _folder_tensors(folder)
    layers = {int(m.group(1)) for m in map(_LAYER_RE.match, infos) if m}
    if layers and len(layers) < model.config.num_layers:   # the plainest account of a thousand missing tensors
        raise ModelFolderError(f"{folder}: the config says num_hidden_layers {model.config.num_layers}, the weights "
                               f"hold {len(layers)} layers (numbered {min(layers)}..{max(layers)})")
    expected = _expected_params(model)
    plan, errors = {}, []
    for name, info in sorted(infos.items()):
        target = model.checkpoint_to_param(name)
        if target is None:
            continue
        if target not in expected:
            errors.append(f"unexpected tensor {name!r} in {info.file.name} (shape {list(info.shape)})")
            continue
        if info.shape != expected[target]:
            errors.append(
                f"tensor {name!r} in {info.file.name} has shape {list(info.shape)}, expected {list(expected[target])}"
            )
            continue
        plan[name] = target
    loaded = set(plan.values())
    for target in sorted(set(expected) - loaded, key=str):
        param, shard = target
        errors.append(f"missing tensor for parameter {param}{f' (shard {shard})' if shard else ''}")
    if errors:   # one line, however many: a config with 100k layers must not print 900k lines
        more = f"; and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
        raise ModelFolderError(f"{folder}: weights do not match {model.config.architecture}: "
                               + "; ".join(errors[:MAX_LISTED_ERRORS]) + more)
    return plan


def _copy_into(param: torch.nn.Parameter, tensor: torch.Tensor, shard: str | None) -> None:
    tensor = tensor.to(device=param.device, dtype=param.dtype)
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        param.data.copy_(tensor)
    else:
        loader(param, tensor, shard)


def load_weights(model: CausalLM, folder: Path, plan: dict[str, tuple[str, str | None]], progress: bool) -> None:
    params = dict(model.named_parameters())
    if is_gguf(folder):
        from .gguf_checkpoint import iter_tensors
        for name, tensor in iter_tensors(folder, model.config):   # one dequantized float32 tensor at a time
            if name in plan:
                param_name, shard = plan[name]
                _copy_into(params[param_name], _narrowed(params[param_name], shard, tensor), shard)
        return
    files = weight_files(folder)
    device = next(model.parameters()).device
    for path in tqdm(files, desc=f"loading {folder.name}", disable=not progress or len(files) < 2):
        # device= streams each tensor straight to its target; no host copy of a whole shard.
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name not in plan:
                    continue
                param_name, shard = plan[name]
                _copy_into(params[param_name], _narrowed(params[param_name], shard, f.get_slice(name)), shard)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported (use one of {sorted(names)})")
    return names[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device, or a ValueError that says what is wrong with the name or this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch has no usable CUDA (torch.cuda.is_available() is "
                             "False); use --device cpu or a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"device {device!r}: only cpu and cuda devices are supported")
    return dev


def load_causal_lm(folder: str | Path, device: str | torch.device, dtype: torch.dtype,
                   progress: bool = True, tp: TensorParallel = SINGLE) -> tuple[CausalLM, ModelConfig]:
    """tp: the tensor-parallel shard to build and load (each checkpoint tensor sliced as it is read)."""
    folder = Path(folder)
    if not folder.is_dir() and not is_gguf(folder):
        raise ModelFolderError(f"{folder}: not a folder (a model is a Hugging Face folder or a .gguf file)")
    config = load_config(folder)
    check_memory(config, folder, torch.device(device), dtype, tp.size)
    with torch.device("meta"), building(tp):
        plan = _plan_loading(build_model(config), folder)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), building(tp):
            model = build_model(config)
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, folder, plan, progress)
    return model.eval().requires_grad_(False), config
