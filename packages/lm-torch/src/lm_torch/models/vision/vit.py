"""A pre-norm ViT encoder shared by the CLIP, SigLIP and InternViT vision towers, and their weight loading.

With x_0 = pre_norm(patch_embed(pixels) [+ cls token] + positions), layer i computes
    h       = x_i + ls1 * proj(attention(norm1(x_i)))
    x_{i+1} = h + ls2 * fc2(act(fc1(norm2(h))))
where ls1/ls2 (InternViT's layer scale) are 1 for CLIP and SigLIP. Hidden state i is x_i, the indexing of
transformers' `hidden_states` (0: the embeddings, after CLIP's pre-norm; L: the output of layer L, before any final
norm). Attention is bidirectional (`scaled_dot_product_attention`, scale head_dim ** -0.5); q, k and v come from one
fused projection, and InternViT's optional qk-norm normalises the whole q (k) vector, not each head.

Only the layers whose outputs are used are built (`ViTSpec.num_layers`); `load_by_rules` maps checkpoint names onto
the parameters, skipping those of the layers not built.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm_torch.layers.activation import ACTIVATIONS

VIT_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **ACTIVATIONS,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The element-wise activation transformers calls `name`."""
    if name not in VIT_ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (supported: {', '.join(VIT_ACTIVATIONS)})")
    return VIT_ACTIVATIONS[name]


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """An image or patch size as (height, width)."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@dataclass(frozen=True)
class ViTSpec:
    """The shape and the variant of a ViT encoder; `num_layers` counts the layers built, `total_layers` the model's."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int
    total_layers: int
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    act: str
    norm_eps: float
    num_channels: int = 3
    rms_norm: bool = False  # RMSNorm (Llama style) instead of LayerNorm in the layers
    cls_token: bool = False
    position_embedding: bool = True
    patch_bias: bool = True
    qkv_bias: bool = True
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    layer_scale: bool = False
    pre_norm: bool = False  # CLIP's `pre_layrnorm`
    post_norm: bool = False  # a LayerNorm the tower applies after its last layer (built only when used)

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row."""
        return self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1]


class RMSNorm(nn.Module):
    """x / rms(x) in float32, times w (cast back first, Llama style) or (1 + w) in float32 (Gemma, `offset=1`)."""

    def __init__(self, size: int, eps: float, offset: float = 0.0, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((size,), 1.0 - offset, dtype=dtype))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise the last dimension."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset == 0.0:
            return self.weight * h.to(x.dtype)
        return (h * (self.offset + self.weight.float())).to(x.dtype)


def make_norm(size: int, eps: float, rms: bool, dtype: torch.dtype | None) -> nn.Module:
    """LayerNorm, or Llama-style RMSNorm."""
    return RMSNorm(size, eps, dtype=dtype) if rms else nn.LayerNorm(size, eps=eps, dtype=dtype)


class ViTAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection."""

    def __init__(self, spec: ViTSpec, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.num_heads = spec.num_heads
        self.head_dim = spec.hidden_size // spec.num_heads
        if self.head_dim * spec.num_heads != spec.hidden_size:
            raise ValueError(f"hidden_size {spec.hidden_size} is not a multiple of num_heads {spec.num_heads}")
        self.qkv = nn.Linear(spec.hidden_size, 3 * spec.hidden_size, bias=spec.qkv_bias, dtype=dtype)
        self.q_norm = RMSNorm(spec.hidden_size, spec.qk_norm_eps, dtype=dtype) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.hidden_size, spec.qk_norm_eps, dtype=dtype) if spec.qk_norm else None
        self.proj = nn.Linear(spec.hidden_size, spec.hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [B, N, D]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B, H, N, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ViTLayer(nn.Module):
    """One pre-norm block: attention then MLP, each added to the residual stream (scaled by ls1/ls2 if present)."""

    def __init__(self, spec: ViTSpec, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.norm1 = make_norm(spec.hidden_size, spec.norm_eps, spec.rms_norm, dtype)
        self.attn = ViTAttention(spec, dtype)
        self.norm2 = make_norm(spec.hidden_size, spec.norm_eps, spec.rms_norm, dtype)
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size, dtype=dtype)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size, dtype=dtype)
        self.act = activation(spec.act)
        self.ls1 = nn.Parameter(torch.ones(spec.hidden_size, dtype=dtype)) if spec.layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(spec.hidden_size, dtype=dtype)) if spec.layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]."""
        h = self.attn(self.norm1(x))
        x = x + (h if self.ls1 is None else self.ls1 * h)
        h = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + (h if self.ls2 is None else self.ls2 * h)


class ViTEncoder(nn.Module):
    """Patch embedding, optional CLS token and pre-norm, `spec.num_layers` layers and an optional final norm."""

    def __init__(self, spec: ViTSpec, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.spec = spec
        d = spec.hidden_size
        self.patch = nn.Conv2d(
            spec.num_channels, d, spec.patch_size, stride=spec.patch_size, bias=spec.patch_bias, dtype=dtype
        )
        num_positions = spec.grid[0] * spec.grid[1] + int(spec.cls_token)
        self.cls = nn.Parameter(torch.zeros(d, dtype=dtype)) if spec.cls_token else None
        self.pos = nn.Parameter(torch.zeros(num_positions, d, dtype=dtype)) if spec.position_embedding else None
        self.pre_norm = nn.LayerNorm(d, eps=spec.norm_eps, dtype=dtype) if spec.pre_norm else None
        self.layers = nn.ModuleList(ViTLayer(spec, dtype) for _ in range(spec.num_layers))
        self.post_norm = nn.LayerNorm(d, eps=spec.norm_eps, dtype=dtype) if spec.post_norm else None

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C, H, W] -> hidden state 0 [B, (1 +) grid_h * grid_w, D], patches in row-major order."""
        if tuple(pixel_values.shape[-2:]) != self.spec.image_size:
            raise ValueError(
                f"images of {tuple(pixel_values.shape[-2:])} pixels, the tower takes {self.spec.image_size}"
            )
        x = self.patch(pixel_values.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1)
        if self.pos is not None:
            x = x + self.pos
        return x if self.pre_norm is None else self.pre_norm(x)

    def forward(self, pixel_values: torch.Tensor, keep: Sequence[int] | None = None) -> list[torch.Tensor]:
        """The hidden states numbered in `keep` (default: the last built), each [B, N, D]; runs no further layer."""
        keep = (len(self.layers),) if keep is None else tuple(keep)
        if any(not 0 <= i <= len(self.layers) for i in keep):
            raise ValueError(f"hidden states {keep} asked of an encoder of {len(self.layers)} built layers")
        states: dict[int, torch.Tensor] = {}
        x = self.embed(pixel_values)
        for i in range(max(keep) + 1):
            if i > 0:
                x = self.layers[i - 1](x)
            if i in keep:
                states[i] = x
        return [states[i] for i in keep]


# A checkpoint-name pattern (matched in full) and the parameter it fills: a template for `re.Match.expand`, or None
# for a tensor the checkpoint may hold but inference never uses.
Rule = tuple[str, str | None]
_QKV = re.compile(r"(.*\.attn\.)([qkv])\.(weight|bias)")
_LAYER = re.compile(r"vision_tower\.layers\.(\d+)\.")


def normalize_name(name: str) -> str:
    """Drop transformers 5's in-memory `model.` and the original checkpoints' `vision_tower.vision_model.` level."""
    name = name.removeprefix("model.")
    if name.startswith("vision_tower.vision_model."):
        name = "vision_tower." + name.removeprefix("vision_tower.vision_model.")
    return name


def _translate(key: str, rules: Sequence[tuple[re.Pattern[str], str | None]], name: str) -> str | None:
    """The parameter the first matching rule names (None: a tensor to skip); ValueError when no rule matches."""
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            return None if template is None else match.expand(template)
    raise ValueError(f"unknown weight {name!r}")


def load_by_rules(
    module: nn.Module,
    tower: ViTEncoder,
    weights: Iterable[tuple[str, torch.Tensor]],
    rules: Sequence[Rule],
    unused: Sequence[str] = (),
    qkv_parts: dict[str, set[str]] | None = None,
) -> tuple[set[str], set[str]]:
    """Copy checkpoint tensors into `module`; returns (parameter names filled, checkpoint names skipped).

    A name is taken as a parameter name of `module` when it is one, else translated by the first rule that matches.
    Skipped: tensors of rules without a target, of layers beyond `tower`'s built ones and of parameters under an
    `unused` prefix. Raises ValueError naming the tensor for an unknown name or a wrong shape. A fused qkv counts as
    filled once its q, k and v have all arrived, across calls sharing `qkv_parts` (the parts seen so far).
    """
    params = dict(module.named_parameters())
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    loaded: set[str] = set()
    skipped: set[str] = set()
    qkv_parts = {} if qkv_parts is None else qkv_parts
    for name, tensor in weights:
        key = normalize_name(name)
        target = key if key in params else _translate(key, compiled, name)
        layer = _LAYER.match(target or "")
        if layer and int(layer.group(1)) >= tower.spec.total_layers:
            raise ValueError(f"weight {name!r} belongs to a layer the model does not have")
        if target is None or (layer and int(layer.group(1)) >= len(tower.layers)) or target.startswith(tuple(unused)):
            skipped.add(name)
            continue
        qkv = _QKV.fullmatch(target)
        param_name = f"{qkv.group(1)}qkv.{qkv.group(3)}" if qkv else target
        if param_name not in params:
            raise ValueError(f"weight {name!r} has no parameter to fill ({param_name!r})")
        dest = params[param_name].data
        if qkv:
            dest = dest.chunk(3, dim=0)["qkv".index(qkv.group(2))]
        while tensor.dim() > dest.dim() and tensor.shape[0] == 1:  # InternViT stores cls/positions as [1, (N,) D]
            tensor = tensor[0]
        if tensor.shape != dest.shape:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor)
        if qkv:
            parts = qkv_parts.setdefault(param_name, set())
            parts.add(qkv.group(2))
            if len(parts) < 3:
                continue
        loaded.add(param_name)
    return loaded, skipped
