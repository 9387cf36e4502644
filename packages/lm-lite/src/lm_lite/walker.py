"""Walking a transformers model one decoder layer at a time over the calibration set.

`LayerWalker` first runs the model up to its first decoder layer (which raises to stop it) to collect the hidden
states entering layer 0 for every calibration sample, and runs it once more on one sample with every layer replaced
by a recorder, to learn the keyword arguments each layer receives (attention mask, rotary cos/sin, ...: Gemma 2/3
give sliding and global layers different ones). Quantizers then take the layers in turn: `layer_on_device(i)` moves
layer i to the device, `forward(i)` runs it over all samples in batches of `batch_size`, and `advance(i)` replaces
the stored hidden states with layer i's outputs, so the next layer sees what the (quantized) layers before it give.
Keyword arguments recorded with one sample broadcast over a batch: masks and cos/sin have a batch dimension of 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import torch
from torch import nn

from lm_lite.model_io import decoder_layers


class _StopForward(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records its inputs, then passes the hidden states on or stops the model."""

    def __init__(self, layer: nn.Module, record: Callable[[tuple, dict], None], stop: bool) -> None:
        super().__init__()
        self.layer, self.record, self.stop = layer, record, stop
        # transformers reads attributes of its layers while looping over them (Gemma 3: attention_type).
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, *args, **kwargs):
        self.record(args, kwargs)
        if self.stop:
            raise _StopForward
        return args[0] if args else kwargs["hidden_states"]


class LayerWalker:
    """The calibration hidden states of the current layer, and the means to run the layers one at a time."""

    def __init__(self, model: nn.Module, samples: torch.Tensor, device: torch.device, batch_size: int) -> None:
        self.model, self.device, self.batch_size = model, device, batch_size
        self.layers_name, self.layers = decoder_layers(model)
        self._move_outside_layers(device)
        with torch.no_grad():
            self.hidden = self._capture_inputs(samples)  # [num_samples, seqlen, hidden] on device
            self.layer_kwargs = self._capture_kwargs(samples[:1])
        self._move_outside_layers(torch.device("cpu"))

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model."""
        return len(self.layers)

    def layer_name(self, index: int) -> str:
        """The dotted module name of decoder layer `index` (its parameters' prefix)."""
        return f"{self.layers_name}.{index}"

    @contextmanager
    def layer_on_device(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer `index` moved to the device for the `with` block, back on the CPU after it."""
        layer = self.layers[index].to(self.device)
        try:
            yield layer
        finally:
            self.layers[index] = layer.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def forward(self, index: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Layer `index` (already on the device) over `hidden` (default: the stored states), in batches."""
        hidden = self.hidden if hidden is None else hidden
        layer, kwargs = self.layers[index], self.layer_kwargs[index]
        outputs = []
        for start in range(0, hidden.shape[0], self.batch_size):
            out = layer(hidden[start : start + self.batch_size], **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outputs)

    def batches(self, index: int) -> Iterator[tuple[torch.Tensor, dict]]:
        """(hidden batch, layer kwargs) pairs, for quantizers that run parts of the layer themselves."""
        for start in range(0, self.hidden.shape[0], self.batch_size):
            yield self.hidden[start : start + self.batch_size], self.layer_kwargs[index]

    def advance(self, index: int) -> None:
        """Make layer `index`'s outputs the stored states (the inputs of layer index + 1)."""
        self.hidden = self.forward(index)

    # -- capture ----------------------------------------------------------------------------------------------------

    def _capture_inputs(self, samples: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def record(args, kwargs):
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())

        original = self.layers[0]
        self.layers[0] = _Recorder(original, record, stop=True)
        try:
            for start in range(0, samples.shape[0], self.batch_size):
                with suppress(_StopForward):
                    self.model(samples[start : start + self.batch_size].to(self.device), use_cache=False)
        finally:
            self.layers[0] = original
        return torch.cat(captured)

    def _capture_kwargs(self, sample: torch.Tensor) -> list[dict]:
        recorded: list[dict] = [{} for _ in self.layers]
        originals = list(self.layers)

        def recorder(i: int):
            def record(args, kwargs):
                recorded[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

            return record

        for i, layer in enumerate(originals):
            self.layers[i] = _Recorder(layer, recorder(i), stop=i == len(originals) - 1)
        try:
            self.model(sample.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        for kwargs in recorded:
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
            kwargs["use_cache"] = False
        return recorded

    def _move_outside_layers(self, device: torch.device) -> None:
        """Everything but the decoder layers (embeddings, rotary tables, final norm, head) to `device`."""
        if self.device.type == "cpu":
            return
        for name, child in self.model.named_children():
            _move_except(child, self.layers, device, name)


def _move_except(module: nn.Module, keep: nn.Module, device: torch.device, name: str) -> None:
    if module is keep:
        return
    if any(sub is keep for sub in module.modules()):
        for child_name, child in module.named_children():
            _move_except(child, keep, device, f"{name}.{child_name}")
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for key, buffer in module.named_buffers(recurse=False):
            setattr(module, key, buffer.to(device))
        return
    module.to(device)


def progress(iterable, desc: str, total: int | None = None):
    """A tqdm progress bar on stderr (layers, samples)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True)


def input_hooks(modules: dict[str, nn.Module], sink: Callable[[str, torch.Tensor], None]):
    """Forward pre-hooks calling sink(name, input [tokens, in_features]) for each module; returns the handles."""

    def make(name: str):
        def hook(_module, args):
            sink(name, args[0].reshape(-1, args[0].shape[-1]))

        return hook

    return [module.register_forward_pre_hook(make(name)) for name, module in modules.items()]
