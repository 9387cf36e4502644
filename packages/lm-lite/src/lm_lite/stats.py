"""Activation statistics: what every decoder linear sees on the calibration set, saved for reuse.

For each linear input channel: absmax (max |x|), absmean (mean |x|), min and max, over all calibration tokens of
the float model. `smooth_quant` reads absmax; they are also what per-channel activation ranges are made of.
They live in the work dir's `calibration/` folder as `stats.safetensors` (tensors named "<linear>.<stat>") with
`meta.json` saying how they were made; a later command in the same work dir reuses them when the model and
calibration settings match.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm_lite.families import Family
from lm_lite.options import CALIBRATION_DIR
from lm_lite.walker import LayerWalker, progress

STATS = ("absmax", "absmean", "min", "max")
STATS_FILE = "stats.safetensors"
META_FILE = "meta.json"


@torch.no_grad()
def collect_stats(walker: LayerWalker, family: Family) -> dict[str, dict[str, torch.Tensor]]:
    """{qualified linear name: {stat: [in_features] float32}}, layer by layer through the float model."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for index in progress(range(walker.num_layers), "calibrate: layers"):
        with walker.layer_on_device(index) as layer:
            counts: dict[str, int] = {}
            local: dict[str, dict[str, torch.Tensor]] = {}

            def make_hook(name: str, local=local, counts=counts):
                def hook(_module, args):
                    x = args[0].reshape(-1, args[0].shape[-1]).float()
                    entry = local.setdefault(
                        name,
                        {
                            "absmax": torch.zeros(x.shape[1], device=x.device),
                            "absmean": torch.zeros(x.shape[1], device=x.device),
                            "min": torch.full((x.shape[1],), float("inf"), device=x.device),
                            "max": torch.full((x.shape[1],), float("-inf"), device=x.device),
                        },
                    )
                    entry["absmax"] = torch.maximum(entry["absmax"], x.abs().amax(dim=0))
                    entry["absmean"] += x.abs().sum(dim=0)  # divided by the count below
                    entry["min"] = torch.minimum(entry["min"], x.amin(dim=0))
                    entry["max"] = torch.maximum(entry["max"], x.amax(dim=0))
                    counts[name] = counts.get(name, 0) + x.shape[0]

                return hook

            handles = [layer.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in family.linears]
            try:
                walker.advance(index)
            finally:
                for handle in handles:
                    handle.remove()
            for name, entry in local.items():
                entry["absmean"] /= counts[name]
                stats[f"{walker.layer_name(index)}.{name}"] = {k: v.cpu() for k, v in entry.items()}
    return stats


def save_stats(work_dir: Path, stats: dict[str, dict[str, torch.Tensor]], meta: dict) -> Path:
    """Writes the per-linear activation statistics and `meta` under `work_dir`; returns the statistics file."""
    from safetensors.torch import save_file

    work_dir = work_dir / CALIBRATION_DIR
    work_dir.mkdir(exist_ok=True)
    flat = {f"{name}.{stat}": tensor.contiguous() for name, entry in stats.items() for stat, tensor in entry.items()}
    save_file(flat, work_dir / STATS_FILE)
    (work_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return work_dir / STATS_FILE


def load_stats(work_dir: Path, meta: dict) -> dict[str, dict[str, torch.Tensor]] | None:
    """The saved statistics if they were made with exactly `meta` (model, data, samples, ...), else None."""
    from safetensors.torch import load_file

    meta_path, stats_path = work_dir / CALIBRATION_DIR / META_FILE, work_dir / CALIBRATION_DIR / STATS_FILE
    if not (meta_path.is_file() and stats_path.is_file()):
        return None
    try:
        saved = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    if saved != meta:
        return None
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(stats_path).items():
        name, _, stat = key.rpartition(".")
        stats.setdefault(name, {})[stat] = tensor
    return stats
