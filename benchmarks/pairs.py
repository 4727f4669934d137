"""The benchmark suites' model pairs: tiny factory pairs and real-shape pairs with random weights.

Model pairs
  tiny        the test factory's `make_tiny_pair` (CPU, seconds to build): a Llama base and a
              shallower Llama nudger of the same width, agreement knob = residual branches x (1 - a).
  olmo2-7b    an OLMo-2-7B-shaped base (hidden 4096, 32 layers, 32 heads, MLP 11008, vocab 100352)
              with an OLMo-2-1B-shaped nudger (hidden 2048, 16 layers, 16 heads, MLP 8192).
  llama3-8b   a Llama-3-8B-shaped base (hidden 4096, 32 layers, 32/8 heads, MLP 14336, vocab 128256)
              with a Llama-3.2-1B-shaped nudger (hidden 2048, 16 layers, 32/8 heads, MLP 8192;
              untied here, the real one ties its embeddings).
  Real shapes get random weights made on the fly (seeded, on the target device, no download) and
  written as Hugging Face folders, preferably into RAM (/dev/shm). `shrink=s` divides widths and
  head counts by s (layers and vocabulary kept), so the same code runs on a CPU in seconds.

Agreement knob across hidden sizes (real-shape pairs)
  Both models' ends are views of ONE shared random "bigram" in a latent space of rank
  r = min(hidden sizes) - 1: U, V ~ N(0, 1) of shape [vocab, r] (same seed for both models), and per
  model a random P_m [r, hidden_m] with orthonormal rows (P_m P_m^T = I_r). Then
      embedding  E_m = U P_m * sqrt(hidden_m / r)          (residual stream RMS ~1)
      LM head    H_m = V P_m * peakiness / sqrt(hidden_m)  (rows past the tokenizer: zero)
      final norm gain = 1 exactly.
  With every residual branch off, a model's logits for input token x are
      H_m RMSNorm(E_m[x]) = peakiness * V U[x] sqrt(1 + c^2) / (sqrt(r) * rms),   rms = sqrt(|U[x]|^2 / r + c^2),
  the same for both models whatever their widths. (Channel 0 is kept out of P: it carries the
  constant c * sqrt(hidden_m) in every embedding row, which the padded vocabulary rows of the head
  read with a negative weight so that padded ids get logits near -40 and no softmax mass.) The transformer blocks are seeded per model
  and their residual branches scaled by (1 - agreement) exactly as the tiny factory does
  (Llama: o_proj and down_proj; OLMo-2: the post-attention / post-feedforward norm gains), so
  agreement 1 = both models are the same bigram, 0 = unrelated blocks on top of it. The knob is
  monotone but not linear (32 layers of noise drown the bigram faster than 2): real-depth pairs
  need agreement near 0.9 for high acceptance. `set_agreement` changes it in place on loaded
  models (engine or transformers) by rescaling those same tensors, so a sweep loads once.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

PAPER_NUDGED_FRACTION = 0.09   # arXiv 2410.09300: "fewer than 9% of tokens nudged"
PAPER_GAMMA = 0.4
DEFAULT_PEAKINESS = 4.5
TOKENIZER_SIZE = 512           # the factory's byte-level tokenizer; real vocabularies are padded to size
SHARD_BYTES = 2 << 30
PAIR_VERSION = 1               # bump when the weights a pair folder gets change
# Real-shape pairs pad a 512-token tokenizer to a real vocabulary (100k+ ids). Zero head rows would
# still hold e^0 of softmax mass each (~1e5 in all) and drown the top-1 probability, so one hidden
# channel carries a constant (BIAS_CHANNEL_RMS x sqrt(hidden): as much energy as all the other
# channels together, so 32 layers of block noise cannot flip its sign) and the padded rows read it
# with a negative weight: their logits sit near -PAD_LOGIT. The real head rows are scaled up by
# sqrt(1 + BIAS_CHANNEL_RMS^2) to undo the share of the RMS norm that the constant takes.
BIAS_CHANNEL_RMS = 1.0
PAD_LOGIT = 40.0

# --------------------------------------------------------------------------- model shapes
TINY_BASE = dict(hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=768)
TINY_NUDGER_LAYERS = 2

REAL_SHAPES: dict[str, dict[str, Any]] = {
    "olmo2-7b": dict(family="olmo2", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                     intermediate_size=11008, vocab_size=100352, max_position_embeddings=4096),
    "olmo2-1b": dict(family="olmo2", hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16,
                     intermediate_size=8192, vocab_size=100352, max_position_embeddings=4096),
    "llama3-8b": dict(family="llama3", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                      overrides=dict(rope_scaling=None)),
    "llama3.2-1b": dict(family="llama3", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                        intermediate_size=8192, vocab_size=128256, max_position_embeddings=8192,
                        overrides=dict(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192})),
}
REAL_PAIRS = {"olmo2-7b": ("olmo2-7b", "olmo2-1b"), "llama3-8b": ("llama3-8b", "llama3.2-1b")}
MODEL_CHOICES = ("tiny", *REAL_PAIRS)

# Residual-branch tensors the agreement knob scales, per family (names as in HF and in the engine).
BRANCH_SUFFIXES = {
    "llama": ("self_attn.o_proj.weight", "mlp.down_proj.weight"),
    "llama3": ("self_attn.o_proj.weight", "mlp.down_proj.weight"),
    "olmo2": ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"),
}


# --------------------------------------------------------------------------- model pairs
@dataclass
class Pair:
    name: str
    base: Path
    nudger: Path
    family: str
    agreement: float                  # the knob the folders were written with
    build_s: float = 0.0
    where: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return dict(name=self.name, base=str(self.base), nudger=str(self.nudger), family=self.family,
                    agreement_written=self.agreement, build_s=round(self.build_s, 1), where=self.where,
                    base_config=_config_summary(self.base), nudger_config=_config_summary(self.nudger),
                    notes=self.notes)


def _config_summary(folder: Path) -> dict:
    c = json.loads((folder / "config.json").read_text())
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "torch_dtype")
    return {k: c.get(k) for k in keys} | {"params": param_count(folder)}


def param_count(folder: Path) -> int:
    from safetensors import safe_open
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    return total


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def kv_bytes_per_token(folder: Path, dtype: torch.dtype) -> int:
    c = json.loads((folder / "config.json").read_text())
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return c["num_hidden_layers"] * 2 * kv * head_dim * torch.empty((), dtype=dtype).element_size()


def tiny_cross_nudger(out_dir: Path, seed: int = 0) -> Path:
    """The tiny pair's nudger shape with a `▁` tokenizer: a cross-tokenizer partner for the byte-level base."""
    from nudge_engine.testing import make_tiny_model
    shape = {**TINY_BASE, "num_layers": TINY_NUDGER_LAYERS}
    return make_tiny_model(out_dir, "llama", "metaspace", seed=seed + 1, **shape)


def tiny_pair(out_dir: Path, agreement: float, seed: int = 0) -> Pair:
    from nudge_engine.testing import make_tiny_pair
    t0 = time.perf_counter()
    base, nudger = make_tiny_pair(out_dir, "llama", "llama", "bytelevel", agreement, seed,
                                  nudger_overrides={"num_layers": TINY_NUDGER_LAYERS}, **TINY_BASE)
    return Pair("tiny", base, nudger, "llama", agreement, time.perf_counter() - t0, str(out_dir),
                [f"tiny factory pair: Llama base {TINY_BASE}, nudger {TINY_NUDGER_LAYERS} layers, float32"])


def scratch_dir(need_bytes: int, label: str) -> tuple[Path, str]:
    """A fresh folder in RAM (/dev/shm) when it has room (1.2x need), else on disk (TMPDIR)."""
    import tempfile
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes * 1.2:
            return Path(tempfile.mkdtemp(prefix=f"nudge-bench-{label}-", dir=shm)), "RAM (/dev/shm)"
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix=f"nudge-bench-{label}-")), "disk (TMPDIR: /dev/shm too small)"


def real_shape_spec(name: str, shrink: int = 1) -> dict:
    """The shape of `name`; shrink > 1 divides widths and head counts (layers and vocabulary kept)."""
    spec = dict(REAL_SHAPES[name])
    if shrink > 1:
        spec["hidden_size"] //= shrink
        spec["intermediate_size"] //= shrink
        spec["num_heads"] = max(1, spec["num_heads"] // shrink)
        spec["num_kv_heads"] = max(1, spec["num_kv_heads"] // shrink)
        if spec["num_heads"] % spec["num_kv_heads"]:
            spec["num_kv_heads"] = 1
    return spec


def real_shape_bytes(name: str, dtype: torch.dtype, shrink: int = 1) -> int:
    s = real_shape_spec(name, shrink)
    h, i, v = s["hidden_size"], s["intermediate_size"], s["vocab_size"]
    hd = h // s["num_heads"]
    per_layer = h * hd * (2 * s["num_heads"] + 2 * s["num_kv_heads"]) + 3 * h * i
    return (s["num_layers"] * per_layer + 2 * v * h) * torch.empty((), dtype=dtype).element_size()


def real_shape_pair(name: str, agreement: float, device: torch.device, dtype: str = "bfloat16", *,
                    seed: int = 0, shrink: int = 1, peakiness: float = DEFAULT_PEAKINESS,
                    out_dir: Path | None = None, log: Callable[[str], None] = print) -> Pair:
    """Write the `name` pair (see REAL_PAIRS) with random seeded weights; see the module docstring."""
    base_name, nudger_name = REAL_PAIRS[name]
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    need = real_shape_bytes(base_name, torch_dtype, shrink) + real_shape_bytes(nudger_name, torch_dtype, shrink)
    if out_dir is None:
        out_dir, where = scratch_dir(need, name)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        where = str(out_dir)
    t0 = time.perf_counter()
    specs = {base_name: real_shape_spec(base_name, shrink), nudger_name: real_shape_spec(nudger_name, shrink)}
    rank = min(s["hidden_size"] for s in specs.values()) - 1  # channel 0 is the constant channel
    folders = []
    for role, mname, mseed in (("base", base_name, seed), ("nudger", nudger_name, seed + 1)):
        folder = out_dir / role
        _write_real_shape_model(folder, specs[mname], seed=mseed, shared_seed=seed, rank=rank,
                                residual_scale=1.0 - agreement, peakiness=peakiness, device=device,
                                dtype=dtype, torch_dtype=torch_dtype)
        folders.append(folder)
        log(f"  wrote {role} ({mname}{f' / {shrink}' if shrink > 1 else ''}, "
            f"{weight_bytes(folder) / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f}s")
    pair = Pair(name + (f"/shrink{shrink}" if shrink > 1 else ""), folders[0], folders[1],
                specs[base_name]["family"], agreement, time.perf_counter() - t0, where)
    pair.notes.append(f"random weights of real shapes ({base_name} + {nudger_name}{f', widths / {shrink}' if shrink > 1 else ''}), "
                      f"{dtype}, shared bigram of rank {rank}, made on {device.type} and written to {where} "
                      f"in {pair.build_s:.1f}s")
    return pair


def _write_real_shape_model(folder: Path, spec: dict, *, seed: int, shared_seed: int, rank: int,
                            residual_scale: float, peakiness: float, device: torch.device, dtype: str,
                            torch_dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from nudge_engine.testing import model_factory as mf
    from nudge_engine.testing import random_weights
    from nudge_engine.testing.tokenizer_factory import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    family = spec["family"]
    traits = mf.FAMILIES[family]
    make_tokenizer(folder, "bytelevel", TOKENIZER_SIZE, model_max_length=spec["max_position_embeddings"])
    special_ids, tokenizer_size = mf._read_tokenizer(folder / "tokenizer.json")
    config = mf._family_config(
        family, hidden_size=spec["hidden_size"], num_layers=spec["num_layers"], num_heads=spec["num_heads"],
        num_kv_heads=spec["num_kv_heads"], head_dim=None,
        intermediate_size=spec["intermediate_size"], vocab_size=spec["vocab_size"],
        max_position_embeddings=spec["max_position_embeddings"], tie_word_embeddings=False, dtype=dtype,
        sliding_window=None, bos_token_id=special_ids["<s>"], eos_token_id=special_ids["</s>"],
        pad_token_id=special_ids["<pad>"])
    config.update(spec.get("overrides", {}))
    hidden, vocab = config["hidden_size"], config["vocab_size"]

    draw = _DeviceDraw(traits, f"{seed}/", device)
    shared = _DeviceDraw(traits, f"shared/{shared_seed}/", device)
    # P [rank, hidden]: orthonormal rows (a QR of a seeded Gaussian, per model) that leave channel 0
    # out; channel 0 carries a constant that the padded head rows read (see BIAS_CHANNEL_RMS).
    q, _ = torch.linalg.qr(draw.normal("bigram.projection", (hidden - 1, rank)))   # [hidden - 1, rank]
    p = torch.zeros(rank, hidden, device=device)
    p[:, 1:] = q.T
    bias_value = BIAS_CHANNEL_RMS * math.sqrt(hidden)   # same share of every model's RMS
    tensors: dict[str, torch.Tensor] = {}
    shards: list[dict[str, torch.Tensor]] = []
    size = 0

    def put(name: str, t: torch.Tensor) -> None:
        nonlocal size
        t = t.to(torch_dtype).contiguous().cpu()
        tensors[name] = t
        size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()

    def flush() -> None:
        nonlocal tensors, size
        if tensors:
            shards.append(tensors)
            save_file(tensors, str(folder / f"model-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards[-1] = {k: None for k in tensors}  # names only; drop the host copies
        tensors, size = {}, 0

    u = shared.normal("bigram.U", (vocab, rank))
    embed = (u @ p) * math.sqrt(hidden / rank)
    embed[:, 0] = bias_value
    put("model.embed_tokens.weight", embed)
    del u, embed
    for i in range(config["num_hidden_layers"]):
        for name, t in random_weights._layer_weights(traits, config, draw, f"model.layers.{i}", residual_scale).items():
            put(name, t)
    put("model.norm.weight", torch.ones(hidden, device=device))
    v = shared.normal("bigram.V", (vocab, rank))
    head = (v @ p) * (peakiness * math.sqrt(1 + BIAS_CHANNEL_RMS ** 2) / math.sqrt(hidden))
    head[tokenizer_size:] = 0.0
    # padded ids: normed channel 0 ~ bias_value / rms, rms ~ sqrt(1 + c^2) -> logit ~ -PAD_LOGIT
    head[tokenizer_size:, 0] = -PAD_LOGIT * math.sqrt(1 + BIAS_CHANNEL_RMS ** 2) / bias_value
    del v
    put("lm_head.weight", head)
    del head
    flush()
    weight_map = {name: f"model-{n:05d}.safetensors" for n, shard in enumerate(shards, 1) for name in shard}
    total = sum(f.stat().st_size for f in folder.glob("model-*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    mf._write_json(folder / "config.json", config)
    mf._write_json(folder / "generation_config.json",
                   {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})


class _DeviceDraw:
    """The factory's seeded initializers (same keys, same formulas), drawn on `device`."""

    def __init__(self, traits, prefix: str, device: torch.device):
        from nudge_engine.testing import random_weights
        self._draw = random_weights._Draw(traits, prefix)
        self._draw.normal = self.normal  # linear() and norm() call normal(); route them here
        self.prefix = prefix
        self.device = device

    def normal(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        key = self.prefix + name
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32)

    def linear(self, *a, **kw):
        return self._draw.linear(*a, **kw)

    def norm(self, *a, **kw):
        return self._draw.norm(*a, **kw)


def make_pair(models: str, agreement: float, device: torch.device, dtype: str, *, work_dir: Path | None = None,
              shrink: int = 1, seed: int = 0, log: Callable[[str], None] = print) -> Pair:
    """The pair `models` in work_dir (default: a scratch folder). A work_dir that already holds the same
    pair (same name, agreement, seed, shrink, dtype; see pair.json there) is reused, so suites run one
    after another (gpu_check.sh) write the 7B weights once."""
    stamp = dict(models=models, agreement=agreement, seed=seed, shrink=shrink,
                 dtype=dtype if models != "tiny" else "float32", version=PAIR_VERSION)
    if work_dir is not None and (work_dir / "pair.json").is_file():
        saved = json.loads((work_dir / "pair.json").read_text())
        if saved.get("stamp") == stamp:
            pair = Pair(**{k: (Path(v) if k in ("base", "nudger") else v) for k, v in saved["pair"].items()})
            pair.notes = pair.notes + [f"reused from {work_dir}"]
            log(f"reusing the pair in {work_dir}")
            return pair
    if models == "tiny":
        import tempfile
        folder = work_dir or Path(tempfile.mkdtemp(prefix="nudge-bench-tiny-"))
        pair = tiny_pair(folder, agreement, seed)
    else:
        pair = real_shape_pair(models, agreement, device, dtype, seed=seed, shrink=shrink, out_dir=work_dir, log=log)
    if work_dir is not None:
        fields = dict(name=pair.name, base=str(pair.base), nudger=str(pair.nudger), family=pair.family,
                      agreement=pair.agreement, build_s=pair.build_s, where=pair.where, notes=pair.notes)
        (work_dir / "pair.json").write_text(json.dumps(dict(stamp=stamp, pair=fields), indent=1))
    return pair


def remove_pair(pair: Pair) -> None:
    """Delete a pair written into a scratch folder (RAM is precious)."""
    root = pair.base.parent
    if root.name.startswith("nudge-bench-"):
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- agreement in place
class AgreementKnob:
    """Rescale the residual-branch tensors of loaded models so they behave like folders written at
    another agreement: tensor = original * (1 - a) / (1 - a_written). Works on engine models and
    transformers models alike (same parameter names)."""

    def __init__(self, family: str, written: float, modules: Iterable[torch.nn.Module]):
        if written >= 1.0:
            raise ValueError("folders written at agreement 1 have no residual branches left to rescale")
        suffixes = BRANCH_SUFFIXES[family]
        self.written = written
        self.current = written
        self.params: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for module in modules:
            for name, param in module.named_parameters():
                if name.endswith(suffixes):
                    # originals of big tensors (Llama's o_proj / down_proj) wait in host memory
                    keep = "cpu" if param.numel() > (1 << 20) else param.device
                    self.params.append((param, param.detach().to(keep, copy=True)))
        if not self.params:
            raise ValueError(f"no residual-branch tensors ({suffixes}) found")

    @torch.no_grad()
    def set(self, agreement: float) -> None:
        factor = (1.0 - agreement) / (1.0 - self.written)
        for param, original in self.params:
            param.copy_(original.to(param.device) * factor)
        self.current = agreement


def engine_modules(engine) -> list[torch.nn.Module]:
    return [m.runner.model for m in engine.models]
