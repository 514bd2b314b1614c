"""LoRA files -> one `LayerDelta` per target layer, in our module names, checked before anything is applied.

Key formats read (one file may mix the spellings of one family):
- kohya / AUTOMATIC1111: `lora_unet_<flat name>.lora_down.weight` / `.lora_up.weight` / `.alpha`, LoCon's
  `.lora_mid.weight` (the Tucker core of a 3x3 conv), LyCORIS LoHa's `.hada_w1_a` ... `.hada_t2`, LoKr's
  `.lokr_w1` (or `_a`/`_b`) and `.lokr_w2` (or `_a`/`_b`);
  `lora_te_` / `lora_te1_` for the text encoder. Flat names in diffusers' or the original LDM naming.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<module>...`;
  diffusers' older `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down.weight` and the attention
  processor names (`attn1.processor.to_q_lora.down.weight`); keys with no component prefix are the U-Net's.
Scale of a layer: alpha / rank (rank = the down factor's rows); no alpha = 1, as kohya and diffusers read it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from sdrt.errors import LoraFileError
from sdrt.lora.targets import KOHYA_PREFIXES, Target, TargetTable

# the last part of a key -> the factor it holds
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
                "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b",
                "hada_t1": "t1", "hada_t2": "t2",
                "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b",
                "lokr_w2": "k2", "lokr_w2_a": "k2a", "lokr_w2_b": "k2b"}
_DIFFUSERS_ROLES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                    ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
                    ".lora_linear_layer.up.weight": "up", ".alpha": "alpha"}
# diffusers' attention-processor LoRA names: `<attn>.processor.to_q_lora.down.weight` -> `<attn>.to_q`
_PROCESSOR = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_COMPONENT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
_LORA_ROLES, _LOHA_ROLES = {"down", "up"}, {"w1a", "w1b", "w2a", "w2b"}
_LOKR_PARTS = {"k1", "k1a", "k1b", "k2", "k2a", "k2b"}


@dataclass
class LayerDelta:
    """One layer's low-rank update; `delta()` is its float32 weight change at LoRA scale 1."""

    target: Target
    factors: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> float32 tensor beside the weight
    keys: dict[str, str] = field(default_factory=dict)              # role -> the file's key, for messages
    alpha: Optional[float] = None

    @property
    def kind(self) -> str:
        if "w1a" in self.factors:
            return "loha"
        return "lokr" if self.factors.keys() & _LOKR_PARTS else "lora"

    def rank(self) -> Optional[int]:
        """The low-rank dimension; None for a LoKr whose two factors are both full matrices."""
        if self.kind == "lokr":
            b = self.factors.get("k1b", self.factors.get("k2b"))
            return None if b is None else b.shape[0]
        return self.factors["w1b" if self.kind == "loha" else "down"].shape[0]

    def scale(self) -> float:
        rank = self.rank()
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    def delta(self) -> torch.Tensor:
        """[out, in] or [out, in, kh, kw] float32 on the factors' device, alpha/rank applied."""
        f = self.factors
        shape = self.target.weight.shape
        if self.kind == "lora":
            up, down = f["up"].flatten(1), f["down"]
            if "mid" in f:  # LoCon Tucker: down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1]
                d = torch.einsum("ijkl,jr,pi->prkl", f["mid"], down.flatten(1), up)
            else:
                d = up @ down.flatten(1)
        elif self.kind == "lokr":
            d = _kron(f)
        else:
            d = _hada(f["w1a"], f["w1b"], f.get("t1")) * _hada(f["w2a"], f["w2b"], f.get("t2"))
        return d.reshape(shape) * self.scale()


    def write_sum(self, out: torch.Tensor, base: torch.Tensor, scale: float) -> None:
        """out = base + scale * delta(), for float32 tensors of the target's shape (one pass for a plain LoRA)."""
        f = self.factors
        if self.kind == "lora" and "mid" not in f and out.is_contiguous() and base.is_contiguous():
            torch.addmm(base.view(base.shape[0], -1), f["up"].flatten(1), f["down"].flatten(1),
                        alpha=scale * self.scale(), out=out.view(out.shape[0], -1))
        else:
            out.copy_(base)
            out.add_(self.delta(), alpha=scale)

    def add_to(self, weight: torch.Tensor, scale: float) -> None:
        """weight += scale * delta(), in place on a float32 tensor of the target's shape (a plain LoRA as
        one addmm, with no full-size temporary)."""
        f = self.factors
        if self.kind == "lora" and "mid" not in f and weight.is_contiguous():
            flat = weight.view(weight.shape[0], -1)
            flat.addmm_(f["up"].flatten(1), f["down"].flatten(1), alpha=scale * self.scale())
        else:
            weight.add_(self.delta(), alpha=scale)


def _lokr_factor(f: dict[str, torch.Tensor], n: str) -> torch.Tensor:
    """LoKr factor n (1 or 2) as a matrix: given whole, or as the product of its a [rows, r] and b [r, ...]."""
    whole = f.get(f"k{n}")
    return (f[f"k{n}a"] @ f[f"k{n}b"].flatten(1)) if whole is None else whole.flatten(1)


def _kron(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """LyCORIS LoKr: kron(w1 [o1, i1], w2 [o2, i2*kh*kw]) is [o1*o2, i1*i2*kh*kw], the weight's flat layout."""
    return torch.kron(_lokr_factor(f, "1"), _lokr_factor(f, "2"))


def _hada(a: torch.Tensor, b: torch.Tensor, t: Optional[torch.Tensor]) -> torch.Tensor:
    if t is None:
        return a @ b.flatten(1)
    return torch.einsum("ijkl,jr,ip->prkl", t, b.flatten(1), a)  # LyCORIS' Tucker form: a is [r, out]


def parse_lora(tensors: Mapping[str, torch.Tensor], table: TargetTable, source: Path) -> dict[str, LayerDelta]:
    """The file's layers by target name; LoraFileError (naming the key) for any key or shape that does not fit."""
    layers: dict[str, LayerDelta] = {}
    for key, value in tensors.items():
        target, role = _resolve(key, table, source)
        layer = layers.setdefault(target.name, LayerDelta(target))
        if role in layer.keys:
            raise LoraFileError(f"{source}: {key!r} and {layer.keys[role]!r} both set {role} of {target.name}")
        layer.keys[role] = key
        if not value.is_floating_point() or (role == "alpha" and value.numel() != 1):
            raise LoraFileError(f"{source}: {key!r} must be a floating-point "
                                f"{'scalar' if role == 'alpha' else 'tensor'}, got {value.dtype} {tuple(value.shape)}")
        if role == "alpha":
            layer.alpha = float(value)
        else:  # float32 beside the weight, so a re-fuse is a few small matmuls
            layer.factors[role] = value.to(target.weight.device, torch.float32)
    if not layers:
        raise LoraFileError(f"{source}: no LoRA tensors in this file")
    for layer in layers.values():
        _check(layer, source)
    return layers


def _resolve(key: str, table: TargetTable, source: Path) -> tuple[Target, str]:
    if key.startswith(tuple(KOHYA_PREFIXES)):
        flat, _, rest = key.partition(".")
        role = _KOHYA_ROLES.get(rest)
        if role is None:
            raise LoraFileError(f"{source}: unsupported LoRA tensor {key!r} (known parts: {', '.join(_KOHYA_ROLES)})")
        target = table.kohya.get(flat)
        if target is None:
            raise LoraFileError(f"{source}: LoRA key {key!r} names no layer of this model ({flat!r})")
        return target, role
    component, name = "unet", key
    for prefix, comp in _COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            component, name = comp, key[len(prefix):]
    m = _PROCESSOR.fullmatch(name)
    if m:
        module = m.group(1) + "." + (m.group(2) + ".0" if m.group(2) == "to_out" else m.group(2))
        role = m.group(3)
    else:
        suffix = next((s for s in _DIFFUSERS_ROLES if name.endswith(s)), None)
        if suffix is None:
            raise LoraFileError(f"{source}: unsupported LoRA tensor {key!r} (expected lora_A/lora_B, lora_down/"
                                f"lora_up, hada_* or alpha keys)")
        module, role = name[: -len(suffix)], _DIFFUSERS_ROLES[suffix]
    target = table.module(component, module)
    if target is None:
        raise LoraFileError(f"{source}: LoRA key {key!r} names no layer of this model's {component} ({module!r})")
    return target, role


def _check(layer: LayerDelta, source: Path) -> None:
    """Every factor present and of a shape whose product is the target's weight shape."""
    roles, name, shape = set(layer.factors) - {"mid", "t1", "t2"}, layer.target.name, layer.target.weight.shape
    if roles & _LOKR_PARTS:  # each factor whole, or as its a and b
        needed = {r for n in "12" for r in ((f"k{n}",) if f"k{n}" in roles else (f"k{n}a", f"k{n}b"))}
    else:
        needed = _LOHA_ROLES if roles & _LOHA_ROLES else _LORA_ROLES
    if roles != needed:
        missing = ", ".join(sorted(needed - roles)) or "none"
        raise LoraFileError(f"{source}: layer {name} has LoRA parts {', '.join(sorted(roles))}; missing {missing}")
    if layer.alpha is not None and not math.isfinite(layer.alpha):
        raise LoraFileError(f"{source}: {layer.keys['alpha']!r} is {layer.alpha}, not a finite number")
    for role, t in layer.factors.items():
        # one float32 sum: NaN or inf anywhere makes it non-finite (fp16 values cannot overflow it)
        if not torch.isfinite(t.sum()):
            raise LoraFileError(f"{source}: {layer.keys[role]!r} holds NaN or inf")
    try:
        with torch.device("meta"):
            meta = LayerDelta(layer.target, {k: v.to("meta") for k, v in layer.factors.items()})
            got = _meta_delta_shape(meta)
    except RuntimeError:
        got = None
    if got is None or math.prod(got) != math.prod(shape) or got[0] != shape[0]:
        parts = ", ".join(f"{layer.keys[r]} {tuple(t.shape)}" for r, t in layer.factors.items())
        raise LoraFileError(f"{source}: LoRA for {name} does not fit its weight {tuple(shape)}: {parts}")


def _meta_delta_shape(layer: LayerDelta) -> Optional[tuple[int, ...]]:
    """The shape of the unreshaped delta, computed on meta tensors (no arithmetic)."""
    f = layer.factors
    if layer.kind == "lokr":
        return tuple(_kron(f).shape)
    if layer.kind == "lora":
        up, down = f["up"].flatten(1), f["down"]
        if "mid" in f:
            return tuple(torch.einsum("ijkl,jr,pi->prkl", f["mid"], down.flatten(1), up).shape)
        return tuple((up @ down.flatten(1)).shape)
    w1, w2 = _hada(f["w1a"], f["w1b"], f.get("t1")), _hada(f["w2a"], f["w2b"], f.get("t2"))
    return tuple(w1.shape) if w1.shape == w2.shape else None
