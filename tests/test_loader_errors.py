"""Bad model folders: each is refused with a ModelFolderError naming the problem, before the model is built.

Every refusal runs under `refuses`, which fails the test if the loader materializes a real (non-meta)
model or reaches `load_weights`: the checks must run on headers and a meta-device model only.
"""
from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nudge_engine
from nudge_engine import ModelFolderError
from nudge_engine.model import loader

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 123\n"
)


class _WritesFileWhenUnpickled:
    """A pickle that, if ever loaded, creates `path`: proof that the loader ran code from the folder."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def folder(tiny_model, tmp_path):
    """folder(family="llama", **kw) -> a private, writable copy of a tiny model folder."""

    def copy(family: str = "llama", **kw) -> Path:
        target = tmp_path / f"{family}-copy"
        shutil.copytree(tiny_model(family, **kw), target)
        return target

    return copy


@pytest.fixture
def real_builds(monkeypatch):
    """Devices of every parameter of every model the loader builds off the meta device."""
    seen: list[str] = []
    build_model = loader.build_model

    def spy(config):
        model = build_model(config)
        seen.extend(p.device.type for p in model.parameters() if p.device.type != "meta")
        return model

    monkeypatch.setattr(loader, "build_model", spy)
    return seen


@pytest.fixture
def refuses(monkeypatch, real_builds):
    """refuses(folder, *fragments): load_model raises ModelFolderError whose message holds every fragment,
    without building a real model or reaching load_weights."""

    def never_called(*args, **kw):
        raise AssertionError("load_weights reached: the folder's problem was not found on the headers")

    monkeypatch.setattr(loader, "load_weights", never_called)

    def check(path: Path, *fragments: str) -> str:
        with pytest.raises(ModelFolderError) as info:
            nudge_engine.load_model(path)
        message = str(info.value)
        for fragment in fragments:
            assert fragment in message
        assert real_builds == [], "a real model was built before the refusal"
        return message

    return check


def rewrite(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_with_header(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_model_folder_error_is_a_value_error():
    assert issubclass(ModelFolderError, ValueError)


def test_the_spy_sees_a_real_build(folder, real_builds):
    """Control for `refuses`: on a good folder the spy does record the real model."""
    model = nudge_engine.load_model(folder())
    assert real_builds and set(real_builds) == {"cpu"}
    assert model.score([[1, 2, 3]])[0].shape == (3, model.config.vocab_size)


def test_missing_tensor(folder, refuses):
    path = folder()
    rewrite(path / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    refuses(path, "missing tensor for parameter model.layers.1.self_attn.qkv_proj.weight (shard k)")


def test_missing_untied_lm_head(folder, refuses):
    path = folder("llama")
    rewrite(path / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    refuses(path, "missing tensor for parameter lm_head.weight")


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.extra.weight", "model.layers.2.mlp.up_proj.weight",
                                  "model.layers.0.self_attn.q_proj.bias"])
def test_unexpected_tensor(folder, refuses, name):
    path = folder()

    def add(tensors):
        tensors[name] = torch.zeros(64) if name.endswith("bias") else torch.zeros(128, 64)

    rewrite(path / "model.safetensors", add)
    refuses(path, f"unexpected tensor {name!r} in model.safetensors")


@pytest.mark.parametrize(("name", "shape", "expected"), [
    ("model.layers.0.mlp.down_proj.weight", (64, 96), "[64, 128]"),
    ("model.layers.1.self_attn.q_proj.weight", (48, 64), "[64, 64]"),  # one part of a fused projection
    ("model.embed_tokens.weight", (100, 64), None),
])
def test_shape_mismatch_is_found_before_the_model_is_built(folder, refuses, name, shape, expected):
    path = folder()

    def reshape(tensors):
        tensors[name] = torch.zeros(shape)

    rewrite(path / "model.safetensors", reshape)
    expected = expected or str([json.loads((path / "config.json").read_text())["vocab_size"], 64])
    refuses(path, f"tensor {name!r} in model.safetensors has shape {list(shape)}, expected {expected}")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(folder, refuses, keep):
    path = folder()
    weights = path / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: int(len(raw) * keep)])
    refuses(path, "model.safetensors", "truncated: tensor")


@pytest.mark.parametrize("size", [0, 5, 40])
def test_file_cut_inside_its_header(folder, refuses, size):
    path = folder()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:size])
    refuses(path, "model.safetensors", "truncated")


def test_garbage_bytes(folder, refuses):
    path = folder()
    garbage = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(7), dtype=torch.uint8)
    (path / "model.safetensors").write_bytes(bytes(garbage.tolist()))
    refuses(path, "model.safetensors", "corrupt")


@pytest.mark.parametrize(("header", "fragment"), [
    (b"{\"a\": [1, 2", "corrupt safetensors header (not JSON)"),
    (b"\xff\xfe\x00garbage", "corrupt safetensors header (not JSON)"),
    (b"[1, 2, 3]", "corrupt safetensors header (not a JSON object)"),
    (b"{\"w\": {\"dtype\": \"F32\"}}", "corrupt safetensors entry for tensor 'w'"),
])
def test_corrupt_header(folder, refuses, header, fragment):
    path = folder()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    refuses(path, "model.safetensors", fragment)


def test_header_offsets_disagree_with_dtype_and_shape(folder, refuses):
    """A consistent-looking header whose byte range does not fit its dtype: safetensors itself would
    refuse it, but only after the model was allocated."""
    path = folder()
    weights = path / "model.safetensors"
    header, data = header_of(weights)
    header["model.layers.0.mlp.down_proj.weight"]["dtype"] = "F16"
    write_with_header(weights, header, data)
    refuses(path, "corrupt safetensors entry for tensor 'model.layers.0.mlp.down_proj.weight'",
            "F16 [64, 128] needs 16384 bytes", "hold 32768")


def test_overlapping_tensors(folder, refuses):
    path = folder()
    weights = path / "model.safetensors"
    header, data = header_of(weights)
    up, gate = header["model.layers.0.mlp.up_proj.weight"], header["model.layers.0.mlp.gate_proj.weight"]
    assert up["data_offsets"] != gate["data_offsets"]
    up["data_offsets"] = gate["data_offsets"]  # same size: each entry alone is consistent
    write_with_header(weights, header, data)
    refuses(path, "model.safetensors", "corrupt safetensors file", "overlapping or gapped")


def test_trailing_bytes_after_the_tensors(folder, refuses):
    path = folder()
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + bytes(100))
    refuses(path, "model.safetensors", "corrupt safetensors file: 100 bytes after the last tensor's data")


def test_git_lfs_pointer_in_place_of_weights(folder, refuses):
    path = folder()
    (path / "model.safetensors").write_text(LFS_POINTER)
    refuses(path, "model.safetensors", "git-lfs pointer", "git lfs pull")


def test_pickle_only_folder_is_refused(folder, refuses, tmp_path):
    path = folder()
    (path / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesFileWhenUnpickled(marker)))
    refuses(path, "pytorch_model.bin", "safetensors only")
    assert not marker.exists()


def test_pickle_folder_with_python_code_is_refused_without_running_it(folder, refuses, tmp_path):
    path = folder()
    (path / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesFileWhenUnpickled(tmp_path / "unpickled")))
    (path / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    refuses(path, "safetensors only")
    assert not marker.exists() and not (tmp_path / "unpickled").exists()


def test_python_code_in_a_good_folder_never_runs(folder, tmp_path):
    path = folder()
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').close()\n"
    (path / "modeling_custom.py").write_text(code)
    (path / "__init__.py").write_text(code)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    model = nudge_engine.load_model(path)
    assert model.score([[5, 6, 7]])[0].isfinite().all()
    assert not marker.exists()


def test_unknown_architecture(folder, refuses):
    path = folder()
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["MysteryForCausalLM", "LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    refuses(path, "architecture 'MysteryForCausalLM' is not supported", "LlamaForCausalLM")


def test_missing_config(folder, refuses):
    path = folder()
    (path / "config.json").unlink()
    refuses(path, "no config.json")


def test_index_lists_a_missing_shard(folder, refuses):
    path = folder("llama", shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    refuses(path, "model.safetensors.index.json", "model-00002-of-00003.safetensors", "not in the folder")


def test_missing_tensor_in_a_sharded_checkpoint(folder, refuses):
    path = folder("llama", shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.gate_proj.weight"
    rewrite(path / index["weight_map"][name], lambda t: t.pop(name))
    refuses(path, "missing tensor for parameter model.layers.1.mlp.gate_up_proj.weight (shard gate)")


def test_not_a_folder(tmp_path, refuses):
    refuses(tmp_path / "nowhere", "not a folder")
