"""Hostile model files (issue 28, items 2, 3 and 10): each is refused with one line naming the file and
the field or tensor, before anything is allocated from its sizes, by the Python API and by the CLI
(`nudge generate` and `nudge serve`, exit status 2)."""
from __future__ import annotations

import json
import math
import shutil
import socket
import struct
import time
from pathlib import Path

import gguf
import pytest
import torch
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

import nudge_engine
from nudge_engine import ModelFolderError, cli
from nudge_engine.model import limits, loader

from gguf_convert import write_gguf

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
FAST_S = 5.0     # a refusal reads a header, never a billion layers


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    folder = tiny_model("llama")
    return write_gguf(folder, tmp_path_factory.mktemp("gguf") / "llama.gguf",
                      {"blk.0.attn_q.weight": "Q8_0", "blk.1.ffn_up.weight": "Q4_1"})


@pytest.fixture
def refuses(monkeypatch):
    """refuses(path, *fragments, shapes=False) -> the one-line message. Fails if the weights were read or a
    model was built, even on the meta device (a billion meta layers hang too), unless `shapes`: then only
    the shape-only (meta) build may run."""
    built = []
    build_model = loader.build_model

    def spy(config):
        built.append(torch.empty(0).device.type)
        return build_model(config)

    def never(*args, **kw):
        raise AssertionError("the weights were read before the file's problem was found")

    monkeypatch.setattr(loader, "build_model", spy)
    monkeypatch.setattr(loader, "load_weights", never)

    def check(path: Path, *fragments: str, shapes: bool = False) -> str:
        t0 = time.monotonic()
        with pytest.raises(ModelFolderError) as info:
            nudge_engine.load_model(path)
        assert built == (["meta"] if shapes else []), built
        message = str(info.value)
        assert time.monotonic() - t0 < FAST_S
        assert len(message.splitlines()) == 1, message
        for fragment in (str(path), *fragments):
            assert fragment in message, message
        return message

    return check


def gguf_with(src: Path, dst: Path, **metadata) -> Path:
    """A copy of a GGUF file with metadata replaced: key=(value, GGUFValueType)."""
    reader = gguf.GGUFReader(src, "r")
    writer = gguf.GGUFWriter(dst, arch=reader.fields["general.architecture"].contents(), endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {k.replace("__", "."): MetadataDetails(t, v)
                                            for k, (v, t) in metadata.items()}, [])
    return dst


def gguf_with_offset(src: Path, dst: Path, tensor: str, offset: int) -> Path:
    """A copy whose tensor-info field for `tensor` holds `offset` (mod 2**64)."""
    reader = gguf.GGUFReader(src, "r")
    t = next(t for t in reader.tensors if t.name == tensor)
    at = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:5])
    data = bytearray(src.read_bytes())
    assert struct.unpack_from("<Q", data, at)[0] == int(t.field.parts[5][0])
    struct.pack_into("<Q", data, at, offset % 2**64)
    dst.write_bytes(bytes(data))
    return dst


def tensor_offset(path: Path, name: str) -> int:
    return next(int(t.field.parts[5][0]) for t in gguf.GGUFReader(path, "r").tensors if t.name == name)


# ---------------------------------------------------------------------------- item 2: tensors of a GGUF file
@pytest.mark.parametrize("offset", [2**64 - 32, 2**63, 2**40])
def test_a_tensor_offset_past_the_end_of_the_file(tiny_gguf, tmp_path, refuses, offset):
    """2**64 - 32 used to wrap around in gguf's uint64 sum and load the bytes before the data section."""
    bad = gguf_with_offset(tiny_gguf, tmp_path / "m.gguf", "blk.1.attn_k.weight", offset)
    refuses(bad, "'blk.1.attn_k.weight'", f"offset {offset}", "past the end of the file")


def test_a_tensor_that_overlaps_another(tiny_gguf, tmp_path, refuses):
    earlier = tensor_offset(tiny_gguf, "blk.0.attn_q.weight")
    bad = gguf_with_offset(tiny_gguf, tmp_path / "m.gguf", "blk.1.attn_k.weight", earlier)
    refuses(bad, "'blk.1.attn_k.weight'", f"starts at offset {earlier}")


def test_a_tensor_whose_shape_disagrees_with_the_config(tiny_gguf, tmp_path, refuses):
    bad = gguf_with(tiny_gguf, tmp_path / "m.gguf", llama__feed_forward_length=(96, gguf.GGUFValueType.UINT32))
    refuses(bad, "mlp", "has shape", "expected", shapes=True)


# ---------------------------------------------------------------------------- item 3: sizes before allocation
CONFIG_CASES = {
    "layers_1e9": ("num_hidden_layers", 10**9, "num_hidden_layers"),
    "layers_1e5": ("num_hidden_layers", 10**5, "num_hidden_layers"),
    "layers_1e9_float": ("num_hidden_layers", 1e9, "num_hidden_layers"),
    "positions_2_62": ("max_position_embeddings", 2**62, "max_position_embeddings"),
    "positions_2_30": ("max_position_embeddings", 2**30, "max_position_embeddings"),
    "hidden_1e7": ("hidden_size", 10**7, "hidden_size"),
    "intermediate_1e8": ("intermediate_size", 10**8, "intermediate_size"),
    "vocab_2_40": ("vocab_size", 2**40, "vocab_size"),
    "heads_1e6": ("num_attention_heads", 10**6, "num_attention_heads"),
    "kv_heads_3_of_4": ("num_key_value_heads", 3, "num_key_value_heads"),
    "head_dim_odd": ("head_dim", 15, "head_dim"),
    "eps_infinite": ("rms_norm_eps", math.inf, "rms_norm_eps"),
    "rope_theta_negative": ("rope_theta", -1.0, "rope_theta"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_sizes_are_bounded_before_allocation(tiny_model, tmp_path, refuses, case):
    field, value, named = CONFIG_CASES[case]
    folder = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    refuses(folder, str(folder / "config.json"), repr(named))


@pytest.mark.parametrize("key,value,named", [
    ("llama__block_count", 10**9, "llama.block_count"),
    ("llama__context_length", 2**62, "llama.context_length"),
    ("llama__embedding_length", 10**8, "llama.embedding_length"),
])
def test_gguf_metadata_sizes_are_bounded_before_allocation(tiny_gguf, tmp_path, refuses, key, value, named):
    bad = gguf_with(tiny_gguf, tmp_path / "m.gguf", **{key: (value, gguf.GGUFValueType.UINT64)})
    refuses(bad, named)


def test_a_model_larger_than_the_device_is_refused_naming_its_largest_part(tiny_model, tmp_path, refuses,
                                                                          monkeypatch):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 1 << 20}))   # within its limit
    monkeypatch.setattr(limits, "device_memory_bytes", lambda device: 1 << 30)
    refuses(folder, "GiB on cpu", "intermediate_size 1048576")


def test_the_memory_estimate_counts_what_the_model_allocates(tiny_model):
    """The estimate is the parameters' bytes plus the rotary table: checked against the built model."""
    import torch
    model = nudge_engine.load_model(tiny_model("llama"))
    runner_model = model.runner.model if hasattr(model, "runner") else model.model
    params = sum(p.numel() * p.element_size() for p in runner_model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in runner_model.buffers())
    parts = limits.estimate_bytes(runner_model.config, torch.float32)
    norms = sum(p.numel() * 4 for n, p in runner_model.named_parameters() if "norm" in n)
    assert sum(parts.values()) == params - norms + buffers


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    spec["added_tokens"].append({"id": vocab, "content": "<beyond>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ModelFolderError, match=rf"tokenizer has {vocab + 1} tokens, more than the model's vocab_size"):
        nudge_engine.NudgeEngine(folder, num_blocks=8)


# ---------------------------------------------------------------------------- item 10: the CLI says the same
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bad_models(tiny_model, tiny_gguf, tmp_path_factory):
    """name -> (path, what the one line must name)."""
    out = tmp_path_factory.mktemp("bad")
    folder = out / "layers"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))
    return {
        "offset": (gguf_with_offset(tiny_gguf, out / "offset.gguf", "blk.1.attn_k.weight", 2**64 - 32),
                   "blk.1.attn_k.weight"),
        "gguf_layers": (gguf_with(tiny_gguf, out / "layers.gguf", llama__block_count=(10**5, gguf.GGUFValueType.UINT32)),
                        "llama.block_count"),
        "gguf_positions": (gguf_with(tiny_gguf, out / "ctx.gguf",
                                     llama__context_length=(2**62, gguf.GGUFValueType.UINT64)), "llama.context_length"),
        "folder_layers": (folder, "num_hidden_layers"),
    }


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize("case", ["offset", "gguf_layers", "gguf_positions", "folder_layers"])
def test_the_cli_refuses_a_bad_model_file_in_one_line(bad_models, capsys, command, case):
    path, named = bad_models[case]
    capsys.readouterr()   # the writers' progress bars
    args = ["--prompt", "hi"] if command == "generate" else ["--port", str(_free_port())]
    t0 = time.monotonic()
    assert cli.main([command, "--base", str(path), *args]) == 2
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"nudge {command}: error: "), err
    assert str(path) in err and named in err, err


def test_the_cli_refuses_a_runaway_chat_template_in_one_line(tiny_gguf, tmp_path, capsys):
    bad = gguf_with(tiny_gguf, tmp_path / "loop.gguf", tokenizer__chat_template=(LOOP, gguf.GGUFValueType.STRING))
    capsys.readouterr()   # the writer's progress bar
    t0 = time.monotonic()
    assert cli.main(["generate", "--base", str(bad), "--chat", "hi", "--chat-template-timeout", "1"]) == 2
    assert time.monotonic() - t0 < 20
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the chat template of {bad}" in err and "time budget (1 s)" in err, err
    # A completion prompt needs no template: the same file generates.
    assert cli.main(["generate", "--base", str(bad), "--prompt", "hi", "--max-tokens", "2",
                     "--chat-template-timeout", "1"]) == 0
