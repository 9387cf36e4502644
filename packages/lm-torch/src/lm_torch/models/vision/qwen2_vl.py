"""Vision towers of Qwen2-VL and Qwen2.5-VL: patches of images and videos in, embeddings for the language model out.

`Qwen2VisionTower.forward(pixel_values, grid_thw)` takes the processor's patches of every item of a step at once
(rows concatenated in item order, each item's rows in the processor's merge-block order) and returns one row per
`merge x merge` block of patches, `t * h * w / merge**2` rows per item, in item order, as transformers'
`...VisionTransformerPretrainedModel` does (its `pooler_output`).

Invariants:
- Patch embedding is a matmul with the Conv3d kernel flattened (stride == kernel, so the two agree).
- Rotary embedding is 2D: half of each head rotates with the patch row, half with the column (float32).
- Attention never crosses a frame: every temporal patch of every item is its own segment. Qwen2.5-VL additionally
  restricts the layers not in `fullatt_block_indexes` to windows of `window_size` pixels (in merged units, padded
  at the bottom/right edges). Tokens are reordered into window order before the first block (whole merge blocks
  move, so the merger still sees its 2x2 groups) and the merged rows are put back in the original order at the end.
- Attention runs per segment (frame or window) without any mask: the segments of a step are grouped by length and
  each group is one batched SDPA call (`segment_groups`, `segment_attention`), so memory grows with the patches,
  not their square, and a 4k image does not need a [patches, patches] mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def segment_groups(cu_seqlens: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """The segments of `cu_seqlens` grouped by length: one [count, length] tensor of token indices per distinct
    length, on `device`. Every token is in exactly one group; attention over a group is one batched call with no
    mask (a frame's or a window's tokens attend each other alone), and there are few groups (a step's images and
    the edge windows of each)."""
    bounds = cu_seqlens.to("cpu", torch.int64)
    starts, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    groups = []
    for length in torch.unique(lengths[lengths > 0]).tolist():
        first = starts[lengths == length]  # [count]
        groups.append((first[:, None] + torch.arange(length)).to(device))  # [count, length]
    return groups


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Attention of every token over the tokens of its own segment. q, k, v: [tokens, heads, head_dim]; `groups`
    from `segment_groups`. Memory grows with the tokens, not their square (no [tokens, tokens] mask)."""
    out = torch.empty_like(q)
    for index in groups:  # [count, length]
        qs, ks, vs = (t[index].transpose(1, 2) for t in (q, k, v))  # each: [count, heads, length, head_dim]
        out[index] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    return out


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative patch counts [num_frames + 1] with one segment per temporal patch of every item."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(per_frame.cumsum(0), (1, 0))


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch [total_patches, 2], patches in merge-block order within each frame."""
    counts = grid_thw.prod(-1)
    widths = torch.repeat_interleave(grid_thw[:, 2], counts)
    frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], counts)
    starts = torch.repeat_interleave(F.pad(counts.cumsum(0)[:-1], (1, 0)), counts)
    within = (torch.arange(int(counts.sum()), device=grid_thw.device) - starts) % frame  # index inside its frame
    block, in_block = within // (merge * merge), within % (merge * merge)
    row = (block // (widths // merge)) * merge + in_block // merge
    col = (block % (widths // merge)) * merge + in_block % merge
    return torch.stack([row, col], dim=-1)


def window_order(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL windows of `window` x `window` merged units: (order [total_units], cu_seqlens [windows + 1]).

    `order[i]` is the merge block (over the whole step) that goes to place i; windows run frame by frame, row-major,
    each window's blocks row-major; cu_seqlens counts patches."""
    orders, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        windows_w = -(-cols // window)
        r = torch.arange(rows).view(1, rows, 1) // window
        c = torch.arange(cols).view(1, 1, cols) // window
        frames = torch.arange(t).view(t, 1, 1) * -(-rows // window)
        window_id = ((frames + r) * windows_w + c).flatten()  # [t * rows * cols]
        orders.append(torch.argsort(window_id, stable=True) + offset)
        lengths.append(torch.bincount(window_id) * merge * merge)
        offset += t * rows * cols
    order = torch.cat(orders).to(grid_thw.device)
    return order, F.pad(torch.cat(lengths).cumsum(0), (1, 0)).to(grid_thw.device)


class _RMSNorm(nn.Module):
    """y = x / rms(x) * w, normalized in float32."""

    def __init__(self, dim: int, eps: float, **factory) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> [..., dim]."""
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in float32 (rotate-half layout): x [tokens, heads, head_dim], cos/sin [tokens, head_dim]."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class _Attention(nn.Module):
    """Bidirectional multi-head attention with fused qkv, within each segment (frame or window) of the step."""

    def __init__(self, dim: int, num_heads: int, **factory) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, **factory)
        self.proj = nn.Linear(dim, dim, **factory)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: list[torch.Tensor]
    ) -> torch.Tensor:
        """x: [tokens, dim], cos/sin: [tokens, head_dim], groups: `segment_groups` -> [tokens, dim]."""
        tokens = x.shape[0]
        q, k, v = self.qkv(x).view(tokens, 3, self.num_heads, -1).unbind(1)  # each: [tokens, heads, head_dim]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = segment_attention(q, k, v, groups)  # [tokens, heads, head_dim]
        return self.proj(out.reshape(tokens, -1))


class _Mlp(nn.Module):
    """Qwen2-VL: fc2(act(fc1 x)). Qwen2.5-VL (gated): down_proj(act(gate_proj x) * up_proj x)."""

    def __init__(self, dim: int, hidden: int, act: str, gated: bool, **factory) -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"vision activation {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
        self.act, self.gated = _ACTIVATIONS[act], gated
        if gated:
            self.gate_proj = nn.Linear(dim, hidden, **factory)
            self.up_proj = nn.Linear(dim, hidden, **factory)
            self.down_proj = nn.Linear(hidden, dim, **factory)
        else:
            self.fc1 = nn.Linear(dim, hidden, **factory)
            self.fc2 = nn.Linear(hidden, dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tokens, dim] -> [tokens, dim]."""
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1 x), then + mlp(norm2 x)."""

    def __init__(self, dim: int, heads: int, hidden: int, act: str, v25: bool, **factory) -> None:
        super().__init__()
        norm = (lambda: _RMSNorm(dim, 1e-6, **factory)) if v25 else (lambda: nn.LayerNorm(dim, 1e-6, **factory))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = _Attention(dim, heads, **factory)
        self.mlp = _Mlp(dim, hidden, act, gated=v25, **factory)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: list[torch.Tensor]
    ) -> torch.Tensor:
        """x: [tokens, dim] -> [tokens, dim]."""
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class _Merger(nn.Module):
    """Norm each patch, concatenate each merge block's patches, then Linear-GELU-Linear to the output width."""

    def __init__(self, dim: int, out_dim: int, merge: int, v25: bool, **factory) -> None:
        super().__init__()
        self.ln_q = _RMSNorm(dim, 1e-6, **factory) if v25 else nn.LayerNorm(dim, 1e-6, **factory)
        self.wide = dim * merge * merge
        self.mlp = nn.Sequential(
            nn.Linear(self.wide, self.wide, **factory), nn.GELU(), nn.Linear(self.wide, out_dim, **factory)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [patches, dim] -> [patches / merge**2, out_dim]."""
        return self.mlp(self.ln_q(x).reshape(-1, self.wide))


class _PatchEmbed(nn.Module):
    """The Conv3d patch projection as a linear layer over the flattened (C, T, P, P) patch."""

    def __init__(self, in_dim: int, dim: int, **factory) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, dim, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [patches, C*T*P*P] -> [patches, dim]."""
        return self.proj(x)


class Qwen2VisionTower(nn.Module):
    """The Qwen2-VL or Qwen2.5-VL vision transformer with its patch merger (chosen by the vision config)."""

    def __init__(
        self, vision_config, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        cfg = vision_config
        factory = {"dtype": dtype, "device": device}
        self.v25 = cfg.model_type == "qwen2_5_vl_vision" or hasattr(cfg, "fullatt_block_indexes")
        dim = cfg.hidden_size if self.v25 else cfg.embed_dim
        out_dim = cfg.out_hidden_size if self.v25 else cfg.hidden_size
        hidden = cfg.intermediate_size if self.v25 else int(cfg.embed_dim * cfg.mlp_ratio)
        self.merge = cfg.spatial_merge_size
        self.head_dim = getattr(cfg, "head_dim", None) or dim // cfg.num_heads
        rope = getattr(cfg, "rope_parameters", None) or {}
        self.rope_theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        self.full_layers = set(cfg.fullatt_block_indexes) if self.v25 else set(range(cfg.depth))
        self.window = cfg.window_size // self.merge // cfg.patch_size if self.v25 else 0  # in merged units
        if self.v25 and self.window < 1:
            raise ValueError(f"window_size {cfg.window_size} is smaller than one merge block of patches")
        patch_shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.patch_embed = _PatchEmbed(math.prod(patch_shape), dim, **factory)
        self.blocks = nn.ModuleList(
            _Block(dim, cfg.num_heads, hidden, cfg.hidden_act, self.v25, **factory) for _ in range(cfg.depth)
        )
        self.merger = _Merger(dim, out_dim, self.merge, self.v25, **factory)
        # Checkpoint shapes that differ from ours: the Conv3d kernel [dim, C, T, P, P], stored flattened.
        self._checkpoint_shapes = {"patch_embed.proj.weight": (dim, *patch_shape)}

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [tokens, 2] (row, col) -> cos, sin [tokens, head_dim] in float32."""
        half = self.head_dim // 2
        inv_freq = 1.0 / self.rope_theta ** (
            torch.arange(0, half, 2, dtype=torch.float32, device=positions.device) / half
        )  # [head_dim / 4]
        angles = (positions.float()[..., None] * inv_freq).flatten(1)  # [tokens, head_dim / 2]: rows | cols
        angles = torch.cat([angles, angles], dim=-1)  # [tokens, head_dim]
        return angles.cos(), angles.sin()

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [total_patches, C*T*P*P], grid_thw [items, 3] -> embeddings [total_patches / merge**2, out]."""
        grid_thw = grid_thw.to(device=pixel_values.device, dtype=torch.long)
        total = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != total:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, grid_thw says {total}")
        if bool((grid_thw[:, 1:] % self.merge).any()):
            raise ValueError(f"grid heights and widths must be multiples of spatial_merge_size {self.merge}")
        unit = self.merge * self.merge
        positions = patch_positions(grid_thw, self.merge)  # [patches, 2]
        frames = segment_groups(frame_cu_seqlens(grid_thw), pixel_values.device)
        windows, order = frames, None
        if self.v25:
            order, cu_windows = window_order(grid_thw, self.merge, self.window)  # order: [patches / unit]
            patch_order = (order[:, None] * unit + torch.arange(unit, device=order.device)).flatten()  # [patches]
            pixel_values, positions = pixel_values[patch_order], positions[patch_order]
            windows = segment_groups(cu_windows, pixel_values.device)
        cos, sin = self.rotary(positions)
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))  # [patches, dim]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in self.full_layers else windows)
        merged = self.merger(x)  # [patches / unit, out]
        if order is None:
            return merged
        restored = torch.empty_like(merged)
        restored[order] = merged  # back to the processor's order
        return restored

    @staticmethod
    def split_per_item(embeddings: torch.Tensor, grid_thw: torch.Tensor, merge_size: int) -> list[torch.Tensor]:
        """Split the tower's output into one [t*h*w / merge_size**2, out] tensor per item of grid_thw."""
        sizes = (grid_thw.prod(-1) // (merge_size * merge_size)).tolist()
        return list(torch.split(embeddings, sizes))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy (name, tensor) pairs named as under transformers' `visual` module in; returns the names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"vision checkpoint tensor {name!r} has no place in the tower")
            param = params[name]
            expected = self._checkpoint_shapes.get(name, tuple(param.shape))
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"vision checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}"
                )
            with torch.no_grad():
                param.copy_(tensor.reshape(param.shape))
            loaded.add(name)
        return loaded
