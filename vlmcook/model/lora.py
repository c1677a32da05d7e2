"""LoRA adapters: `y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`, with W (and b) frozen.

Notable:
- `LoRALinear` *is* an `nn.Linear` (subclass) that keeps the base `weight` / `bias` under their own names, so a
  model with adapters still has every released key (`llm.model.layers.0.self_attn.q_proj.weight`, ...) plus
  `...q_proj.lora_A` / `...q_proj.lora_B`; saving the base in the released layout is a key filter, not a rename.
- Init as in the LoRA paper (and peft): A ~ kaiming-uniform(a=sqrt(5)), B = 0, so a fresh adapter is the identity
  change and training starts from the base model's outputs exactly.
- Default targets are the LLM attention projections q/k/v/o, as the released finetune script does (r=64, alpha=64,
  dropout 0.05; docs/reference.md R6). Vision / resampler targets are opt-in by regex.
- `merge_lora` folds `W + (alpha/r) B A` into plain `nn.Linear`s in place: the state_dict is then exactly the
  released key set.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

# Released names: llm.model.layers.{i}.self_attn.{q,k,v,o}_proj
DEFAULT_TARGETS = r"^llm\.model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj$"


class LoRALinear(nn.Linear):
    """A frozen Linear plus a trainable low-rank update of rank r, scaled by alpha / r."""

    def __init__(self, in_features: int, out_features: int, bias: bool, r: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @staticmethod
    def from_linear(base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Wrap `base` sharing its weight / bias tensors (no copy)."""
        w = base.weight
        lora = LoRALinear(base.in_features, base.out_features, base.bias is not None, r, alpha, dropout,
                          device=w.device, dtype=w.dtype)
        lora.weight = nn.Parameter(w.data, requires_grad=False)
        if base.bias is not None:
            lora.bias = nn.Parameter(base.bias.data, requires_grad=False)
        return lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        # [.., in] -> [.., r] -> [.., out]; the low-rank path never materialises a full [out, in] delta.
        return base + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # [out, in]
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def add_lora(model: nn.Module, targets: str = DEFAULT_TARGETS, r: int = 64, alpha: float = 64.0,
             dropout: float = 0.05) -> list[str]:
    """Replace every nn.Linear whose full module name matches `targets` (re.search) by a LoRALinear; freeze every
    non-LoRA parameter of those layers. Returns the wrapped names; raises if nothing matched (a typo in the regex
    would otherwise train nothing)."""
    pattern = re.compile(targets)
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and pattern.search(n)]
    if not names:
        raise ValueError(f"LoRA targets {targets!r} match no nn.Linear in {type(model).__name__}")
    for n in names:
        _set_submodule(model, n, LoRALinear.from_linear(model.get_submodule(n), r, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear modules back (in place; returns model)."""
    for n, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.weight.device,
                              dtype=m.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(m.merged_weight())
                if m.bias is not None:
                    plain.bias.copy_(m.bias)
            _set_submodule(model, n, plain)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: `<module>.lora_A` [r, in] and `<module>.lora_B` [out, r]."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything but the adapters: exactly the released key set (unmerged base weights)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
