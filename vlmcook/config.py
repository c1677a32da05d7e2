"""Architecture configs: one frozen dataclass per component, a few named presets, and the released config.json.

- `VisionConfig`, `ResamplerConfig`, `LLMConfig` each go to exactly one module; `MiniCPMVConfig` composes them and
  carries the preprocessing numbers the trained weights depend on (patch size, query count, slice rules).
- Presets: `tiny` (CPU tests, seconds), `v4_5` (the released 8B model, docs/reference.md 2).
- `MiniCPMVConfig.from_hf_dict` reads the released `config.json` layout; anything unknown or contradictory raises
  `ConfigError` naming the field. `to_hf_dict` writes the same layout back, so other tools can read our checkpoints.
  Fields the release does not have (our tiny resampler's head count) go under keys no other tool reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config field is unknown, missing or contradicts another one."""


# Largest model a config may describe: 4 TB of float32 weights, more memory than one machine holds (115x the
# released 8.7B). Checked from the sizes alone, before anything is allocated (docs/reliability.md).
MAX_PARAMETERS = 10**12


def _check_fields(cfg, prefix: str) -> None:
    """Types and signs first, so that no later arithmetic meets a string or a zero: sizes and counts are ints >= 1
    (token ids >= 0), epsilons and rope_theta positive finite numbers."""
    for f in fields(cfg):
        v, name = getattr(cfg, f.name), prefix + f.name
        if f.type == "int":
            low = 0 if f.name.endswith("_token_id") else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        elif f.type == "float" and (not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < math.inf):
            raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
        elif f.type in ("bool", "str") and type(v).__name__ != f.type:
            raise ConfigError(f"{name} must be a {f.type}, got {v!r}")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP-so400m/14 NaViT tower (`vpm`)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 980  # 980 / 14 = 70 -> a 70x70 table of learned position embeddings
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def __post_init__(self):
        _check_fields(self, "vision_config.")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config.hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config.image_size {self.image_size} is not a multiple of "
                              f"patch_size {self.patch_size}")


@dataclass(frozen=True)
class ResamplerConfig:
    """One cross-attention layer from `num_queries` learned queries to a view's (or a video package's) patches."""

    num_queries: int = 64
    embed_dim: int = 4096  # = LLM hidden size
    num_heads: int = 32  # the release derives embed_dim // 128
    kv_dim: int = 1152  # = vision hidden size
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _check_fields(self, "resampler.")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"resampler embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 4:
            raise ConfigError(f"resampler embed_dim {self.embed_dim} must be divisible by 4 (2-D sincos halves)")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass(frozen=True)
class LLMConfig:
    """Qwen3 decoder (`llm`)."""

    vocab_size: int = 151748
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    bos_token_id: int = 151643
    eos_token_id: int = 151645

    def __post_init__(self):
        _check_fields(self, "")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")


@dataclass(frozen=True)
class MiniCPMVConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    # Preprocessing numbers the weights were trained with (docs/reference.md 2.2, 2.4).
    scale_resolution: int = 448  # a view is resized to about scale_resolution^2 pixels
    max_slice_nums: int = 9
    use_image_id: bool = True
    vision_batch_size: int = 16  # views per vision-tower call at inference (bounds activation memory)
    torch_dtype: str = "bfloat16"  # dtype of the stored weights
    # vlmcook's own: a model trained with the question before its images/videos (the demo's, which reads a page by
    # copying the visual tokens right before its answer) says so; the processor then orders every user turn so.
    # Saved as "text_first" only when true, so the released layout stays as released.
    text_first: bool = False

    def __post_init__(self):
        _check_fields(self, "")
        if self.resampler.embed_dim != self.llm.hidden_size:
            raise ConfigError(f"resampler embed_dim {self.resampler.embed_dim} != llm hidden_size "
                              f"{self.llm.hidden_size}")
        if self.resampler.kv_dim != self.vision.hidden_size:
            raise ConfigError(f"resampler kv_dim {self.resampler.kv_dim} != vision hidden_size "
                              f"{self.vision.hidden_size}")
        parts = parameter_parts(self)
        total = sum(n for n, _ in parts)
        if total > MAX_PARAMETERS:
            raise ConfigError(f"config implies {total:.3g} parameters, over the limit of {MAX_PARAMETERS:.0e} "
                              f"(4 TB of float32 weights); the largest part is {max(parts)[1]}")

    @property
    def query_num(self) -> int:
        return self.resampler.num_queries

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    # ---- presets -------------------------------------------------------------------------------------------
    @staticmethod
    def from_name(name: str, **overrides) -> "MiniCPMVConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    # ---- the released config.json layout --------------------------------------------------------------------
    @staticmethod
    def from_hf_dict(d: dict[str, Any]) -> "MiniCPMVConfig":
        return _from_hf_dict(d)

    @staticmethod
    def from_file(path: str | Path) -> "MiniCPMVConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return _from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        return _to_hf_dict(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Released fields we read, and released fields whose value must be exactly this for 4.5 numerics.
_LLM_KEYS = {f for f in LLMConfig.__dataclass_fields__}
_FIXED = {
    "model_type": "minicpmv",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "rope_scaling": None,
    "use_sliding_window": False,
    "drop_vision_last_layer": False,  # the 4.5 release uses all 27 layers; 2.x dropped the last one
    "slice_mode": True,
}
_IGNORED = {  # bookkeeping or flags of the reference's code paths that do not change the math
    "_name_or_path", "architectures", "auto_map", "transformers_version", "use_cache", "initializer_range",
    "sliding_window", "max_window_layers", "batch_vision_input", "batch_3d_resampler", "image_size", "version",
    "pad_token_id",
}
_VISION_FIXED = {"model_type": "siglip", "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0}
_VISION_KEYS = {f for f in VisionConfig.__dataclass_fields__}
# Our own keys for fields the release derives (resampler heads = embed_dim // 128) or leaves at a class default.
_OWN_KEYS = {"query_num", "patch_size", "vision_config", "slice_config", "resampler_num_heads", "use_image_id",
             "vision_batch_size", "torch_dtype", "text_first"}


def _from_hf_dict(d: dict[str, Any]) -> MiniCPMVConfig:
    for name, value in (("config", d), ("vision_config", d.get("vision_config", {}) if isinstance(d, dict) else {}),
                        ("slice_config", d.get("slice_config") or {} if isinstance(d, dict) else {})):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a JSON object, got {type(value).__name__}")
    unknown = set(d) - _LLM_KEYS - set(_FIXED) - _IGNORED - _OWN_KEYS
    if unknown:
        raise ConfigError(f"unknown config field(s) {sorted(unknown)}")
    for k, want in _FIXED.items():
        if k in d and d[k] != want:
            raise ConfigError(f"config field {k!r} is {d[k]!r}; MiniCPM-V 4.5 needs {want!r}")
    missing = {"hidden_size", "num_hidden_layers", "vocab_size", "vision_config"} - set(d)
    if missing:
        raise ConfigError(f"config is missing field(s) {sorted(missing)}")
    llm = LLMConfig(**{k: d[k] for k in _LLM_KEYS if k in d})

    vd = dict(d["vision_config"])
    unknown = set(vd) - _VISION_KEYS - set(_VISION_FIXED)
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)} in vision_config")
    for k, want in _VISION_FIXED.items():
        if k in vd and vd[k] != want:
            raise ConfigError(f"vision_config.{k} is {vd[k]!r}; MiniCPM-V 4.5 needs {want!r}")
    vision = VisionConfig(**{k: vd[k] for k in _VISION_KEYS if k in vd})

    patch = d.get("patch_size", vision.patch_size)
    sc = dict(d.get("slice_config") or {})
    sc.pop("model_type", None)
    unknown = set(sc) - {"max_slice_nums", "patch_size", "scale_resolution"}
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)} in slice_config")
    for name, value in (("patch_size", patch), ("slice_config.patch_size", sc.get("patch_size", patch))):
        if value != vision.patch_size:
            raise ConfigError(f"{name} {value} contradicts vision_config.patch_size {vision.patch_size}")

    heads = d.get("resampler_num_heads", llm.hidden_size // 128)
    resampler = ResamplerConfig(num_queries=d.get("query_num", 64), embed_dim=llm.hidden_size, num_heads=heads,
                                kv_dim=vision.hidden_size)
    return MiniCPMVConfig(vision=vision, resampler=resampler, llm=llm,
                          scale_resolution=sc.get("scale_resolution", 448),
                          max_slice_nums=sc.get("max_slice_nums", 9),
                          use_image_id=d.get("use_image_id", True),
                          vision_batch_size=d.get("vision_batch_size", 16),
                          torch_dtype=d.get("torch_dtype", "bfloat16"),
                          text_first=d.get("text_first", False))


def parameter_parts(c: MiniCPMVConfig) -> list[tuple[int, str]]:
    """(parameter count, the fields that make it) of each part of the model, as its modules allocate them
    (tests/test_checkpoint_limits.py checks the sum against the built model)."""
    m, v, r = c.llm, c.vision, c.resampler
    H, I, V, L = m.hidden_size, m.intermediate_size, m.vocab_size, m.num_hidden_layers
    attn = H * (2 * m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim + 2 * m.head_dim  # + q/k norms
    llm_layers = L * (attn + 3 * H * I + 2 * H) + H
    Hv, Iv, Lv = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    vision = (v.num_channels * v.patch_size**2 + 1 + v.num_patches_per_side**2 + 2) * Hv \
        + Lv * (4 * Hv * Hv + 2 * Hv * Iv + Iv + 9 * Hv)
    D = r.embed_dim
    resampler = (r.num_queries + r.kv_dim + 5 * D + 10) * D
    return [(2 * V * H, f"the LLM embeddings and head: 2 x vocab_size {V} x hidden_size {H}"),
            (llm_layers, f"the LLM layers: num_hidden_layers {L} x (hidden_size {H}, intermediate_size {I}, "
                         f"heads {m.num_attention_heads} + {m.num_key_value_heads} x head_dim {m.head_dim})"),
            (vision, f"the vision tower: vision_config.num_hidden_layers {Lv} x (hidden_size {Hv}, intermediate_size "
                     f"{Iv}), image_size {v.image_size} / patch_size {v.patch_size}"),
            (resampler, f"the resampler: (query_num {r.num_queries} + {r.kv_dim} + 5 x {D}) x hidden_size {D}")]


def _to_hf_dict(c: MiniCPMVConfig) -> dict[str, Any]:
    d: dict[str, Any] = {"architectures": ["MiniCPMV"], "model_type": "minicpmv", "version": 4.5}
    d.update(asdict(c.llm))
    d.update({"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
              "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
              "max_window_layers": c.llm.num_hidden_layers, "use_cache": True, "torch_dtype": c.torch_dtype,
              "batch_vision_input": True, "batch_3d_resampler": True, "drop_vision_last_layer": False,
              "image_size": c.scale_resolution, "patch_size": c.patch_size, "query_num": c.query_num,
              "slice_mode": True, "use_image_id": c.use_image_id, "vision_batch_size": c.vision_batch_size,
              "slice_config": {"max_slice_nums": c.max_slice_nums, "patch_size": c.patch_size,
                               "scale_resolution": c.scale_resolution, "model_type": "minicpmv"},
              "vision_config": {**asdict(c.vision), "model_type": "siglip", "hidden_act": "gelu_pytorch_tanh"}})
    if c.resampler.num_heads != c.llm.hidden_size // 128:
        d["resampler_num_heads"] = c.resampler.num_heads
    if c.text_first:
        d["text_first"] = True
    return d


_TINY_VISION = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_TINY_LLM = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2)

PRESETS: dict[str, MiniCPMVConfig] = {
    "v4_5": MiniCPMVConfig(),
    # tiny: 2 layers everywhere, 8 queries, 224-px views (256 patches): a forward takes milliseconds on a CPU.
    "tiny": MiniCPMVConfig(
        vision=_TINY_VISION,
        resampler=ResamplerConfig(num_queries=8, embed_dim=64, num_heads=4, kv_dim=32),
        llm=_TINY_LLM,
        scale_resolution=224,
        max_slice_nums=4,
        torch_dtype="float32",
    ),
    # demo: what `vlmcook demo` trains from scratch on a CPU (1.3M parameters): a 3-layer 128-wide Qwen3, a 2-layer
    # 64-wide SigLIP, 42 queries (one per cell of a tape page's 3 text rows x 14 columns, data/docs/grid.py) and
    # single 140-px-scale views, so a 196 x 98 page or video frame stays one 7 x 14-patch view.
    "demo": MiniCPMVConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
        resampler=ResamplerConfig(num_queries=42, embed_dim=128, num_heads=4, kv_dim=64),
        llm=replace(_TINY_LLM, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32),
        scale_resolution=140,
        max_slice_nums=1,
        torch_dtype="float32",
        text_first=True,
    ),
}
