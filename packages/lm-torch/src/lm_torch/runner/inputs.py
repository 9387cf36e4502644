"""A step's model inputs: one host layout (`build_host_step`) for every device, then moved to where the model runs.

`build_host_step` lays a `ScheduledBatch` out in numpy arrays: token ids, positions, KV slots, the kernels' lengths
and block tables. On the CPU the tensors are views of those arrays. On CUDA every per-step tensor the forward pass
reads (those, plus which hidden rows are sampled and the prefill tiles) is one segment of a single pinned int32
buffer: one non-blocking copy moves it, and the tensors are views of the device copy, so there is no host-device
synchronisation anywhere (a `torch.tensor(..., device="cuda")` would wait for every kernel queued before it, which
is exactly the work the host should be overlapping).

A token the step reads whose value is not on the host yet (a pending token: the engine schedules step N + 1 before
step N's sampled tokens are back) has its request's token-buffer slot in `sources`: `resolve_input_ids` reads it
from the runner's device buffer, which every step's sampler writes. Its entry in `input_ids` is 0 and unused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from lm_torch.scheduler import ScheduledBatch


def round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


@dataclass
class HostStep:
    """One step's inputs, still on the host (numpy int32 arrays)."""

    input_ids: np.ndarray  # [num_tokens]; 0 where the token is pending
    sources: np.ndarray  # [num_tokens]: the token-buffer slot holding a pending token, or -1
    positions: np.ndarray  # [num_tokens]
    slot_mapping: np.ndarray  # [num_tokens]
    query_start_loc: np.ndarray  # [num_seqs + 1]
    context_lens: np.ndarray  # [num_seqs]
    block_tables: np.ndarray  # [num_seqs, width], width a multiple of 16 (one triton specialisation for strides)
    query_lens: list[int]
    context_lens_list: list[int]

    @property
    def num_tokens(self) -> int:
        """Tokens in the step."""
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        """Sequences in the step."""
        return len(self.query_lens)


def build_host_step(batch: ScheduledBatch, block_size: int, slots: list[int], width: int = 0) -> HostStep:
    """Lay out `batch` on the host. `slots[i]`: the token-buffer slot of row i's request (read for its pending input
    token, if it has one); `width`: a minimum block-table width."""
    num_new = batch.num_new_tokens
    num_seqs = len(num_new)
    starts = np.asarray(batch.starts, dtype=np.int64)
    lens = np.asarray(num_new, dtype=np.int64)
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    known = batch.token_ids
    sources = np.full(num_tokens, -1, dtype=np.int64)
    pending_rows = [i for i in range(num_seqs) if len(known[i]) != num_new[i]]
    if pending_rows:
        ids = np.zeros(num_tokens, dtype=np.int64)
        for i in range(num_seqs):
            first = int(query_start_loc[i])
            ids[first : first + len(known[i])] = known[i]
        for i in pending_rows:
            if num_new[i] - len(known[i]) != 1 or slots[i] < 0:
                raise RuntimeError(f"row {i} reads {num_new[i] - len(known[i])} pending tokens without a slot")
            sources[query_start_loc[i + 1] - 1] = slots[i]  # a pending token is always the row's last
    else:
        ids = np.fromiter(chain.from_iterable(known), dtype=np.int64, count=num_tokens)
    # Token t belongs to sequence seq_of[t] and sits at position start + (t - first token of that sequence).
    seq_of = np.repeat(np.arange(num_seqs), lens)
    positions = np.arange(num_tokens) + np.repeat(starts - query_start_loc[:-1], lens)
    context_lens = starts + lens
    tables_list = batch.block_tables
    table_width = round_up(max(width, max((len(t) for t in tables_list), default=1), 1), 16)
    tables = np.zeros((num_seqs, table_width), dtype=np.int64)
    for i, table in enumerate(tables_list):
        tables[i, : len(table)] = table
    slot_mapping = tables[seq_of, positions // block_size] * block_size + positions % block_size
    return HostStep(
        input_ids=ids,
        sources=sources,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=query_start_loc,
        context_lens=context_lens,
        block_tables=tables,
        query_lens=list(num_new),
        context_lens_list=context_lens.tolist(),
    )


def eager_token_bucket(num_tokens: int) -> int:
    """The token count an eager step is padded to: a multiple of 16 up to 128 tokens, of 32 up to 512, of 64 up to
    1024, of 128 up to 2048, of 256 beyond (44 counts up to 4096). cuBLAS picks a GEMM kernel for each new shape it
    sees, which costs far more host time than a call on a shape seen before (benchmarks/RESULTS.md): with a fresh
    token count in every mixed step, a large part of the step's host time. The counts are warmed up at start-up
    (`cuda_linear.warm_up_gemms`); the padding adds at most a quarter (at 129 tokens), mostly under 1/16, of rows
    to the row-wise layers."""
    for limit, multiple in ((128, 16), (512, 32), (1024, 64), (2048, 128)):
        if num_tokens <= limit:
            return round_up(max(num_tokens, 1), multiple)
    return round_up(num_tokens, 256)


def pad_host_step(host: HostStep, num_tokens: int) -> HostStep:
    """`host` with padding tokens appended up to `num_tokens`: id 0, position 0, slot -1 (no KV written), no source.
    They belong to no sequence (`query_start_loc` ends at the real tokens), so attention never reads or writes
    them; their rows flow through the row-wise layers and are never sampled."""
    pad = num_tokens - host.num_tokens
    if pad < 0:
        raise ValueError(f"cannot pad a step of {host.num_tokens} tokens to {num_tokens}")
    if pad == 0:
        return host

    def extend(values: np.ndarray, fill: int) -> np.ndarray:
        return np.concatenate([values, np.full(pad, fill, dtype=values.dtype)])

    return HostStep(
        input_ids=extend(host.input_ids, 0),
        sources=extend(host.sources, -1),
        positions=extend(host.positions, 0),
        slot_mapping=extend(host.slot_mapping, -1),
        query_start_loc=host.query_start_loc,
        context_lens=host.context_lens,
        block_tables=host.block_tables,
        query_lens=host.query_lens,
        context_lens_list=host.context_lens_list,
    )


@contextlib.contextmanager
def zero_padding_rows(model, padding: torch.Tensor | int):
    """While the block runs, `model.embed_tokens` returns zeros in a step's padding rows: where `padding` ([rows]
    bool, a graph's rows of context 0) is set, or from row `padding` (an int: an eager step's real tokens) on.

    A padding row then stays zero through a decoder without biases (RMSNorm, rotary, the MLP and the residual adds
    map zeros to zeros; attention writes zeros there: a graph's padding rows attend no context, and the Triton
    backend zeroes an eager step's rows past `StepMetadata.num_real_tokens`), so the GEMMs multiply zeros in those rows.
    The result is the same, but the steps of a full batch can run at the GPU's power limit, and tensor cores draw less
    power on zero operands than on the rows' old contents (token 0's activations, or whatever memory the attention
    output reused)."""

    def hook(module, args, output):
        if isinstance(padding, int):
            output[padding:] = 0
            return output
        return output.masked_fill_(padding[:, None], 0)

    handle = model.embed_tokens.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# Every segment starts at a multiple of 128 bytes: triton specialises a kernel on whether each pointer argument is
# 16-byte aligned, so a view at an unaligned offset would compile (for about a second) another copy of the kernel.
SEGMENT_ALIGNMENT = 32  # int32 elements


class Segments:
    """Offsets of named int32 segments packed one after another (the same on the host and the device), each
    starting at an aligned offset."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in sizes.items():
            self.offsets[name] = (offset, size)
            offset += round_up(size, SEGMENT_ALIGNMENT)
        self.total = offset

    def view(self, buffer, name: str):
        """The `name` segment of `buffer` (host or device)."""
        start, size = self.offsets[name]
        return buffer[start : start + size]

    def end(self, name: str) -> int:
        """The offset just past the `name` segment."""
        start, size = self.offsets[name]
        return start + size


class PinnedStaging:
    """Pinned host buffers used in turn; one is rewritten only once the copy out of it has finished.

    Without CUDA (tests of the layouts on a CPU machine) the buffers are ordinary memory and copies are immediate.
    """

    def __init__(self, num_elements: int, depth: int = 2, dtype: torch.dtype = torch.int32) -> None:
        self.pinned = torch.cuda.is_available()
        self.buffers = [torch.empty(num_elements, dtype=dtype, pin_memory=self.pinned) for _ in range(depth)]
        self.events: list[torch.cuda.Event | None] = [None] * depth
        self._next = 0
        self._current = 0

    def acquire(self) -> tuple[torch.Tensor, np.ndarray]:
        """The next buffer (as a tensor and a numpy view of it), once the copy out of it queued earlier is done."""
        index = self._next
        self._next = (index + 1) % len(self.buffers)
        event = self.events[index]
        if event is not None:
            event.synchronize()  # queued a step or two ago: in practice long finished
        self._current = index
        return self.buffers[index], self.buffers[index].numpy()

    @property
    def current_index(self) -> int:
        """Index of the buffer `acquire` last returned."""
        return self._current

    def upload(self, num_elements: int, destination: torch.Tensor) -> None:
        """Copy the first `num_elements` of the acquired buffer into `destination` (on the device) without waiting."""
        index = self._current
        destination[:num_elements].copy_(self.buffers[index][:num_elements], non_blocking=True)
        self.mark_used(index)

    def mark_used(self, index: int) -> None:
        """Record that copies queued so far involve buffer `index` (`acquire` waits for them before reusing it)."""
        if self.pinned:
            event = torch.cuda.Event()
            event.record()
            self.events[index] = event


@dataclass
class DeviceStep:
    """A step's inputs on the device: int32 views of one buffer (see `HostStep` for the meaning of each)."""

    input_ids: torch.Tensor  # [T]
    sources: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T]
    query_start_loc: torch.Tensor  # [S + 1]
    context_lens: torch.Tensor  # [S]
    block_tables: torch.Tensor  # [S, width]
    sample_index: torch.Tensor | None = None  # [R] the token rows whose hidden states are sampled (eager steps)
    sample_slots: torch.Tensor | None = None  # [R] the token-buffer slot each sampled row writes (eager steps)
    tile_seq: torch.Tensor | None = None  # [tiles] the prefill kernel's tiles (eager steps)
    tile_first: torch.Tensor | None = None


def prefill_tile_arrays(query_lens: list[int], tokens_per_tile: int) -> tuple[np.ndarray, np.ndarray]:
    """The prefill kernel's tiles (as `kernels.prefill_attention.prefill_tiles`, on the host): sequences with more
    than one new token, cut every `tokens_per_tile` tokens."""
    seqs = [i for i, n in enumerate(query_lens) if n > 1 for _ in range(0, n, tokens_per_tile)]
    firsts = [first for n in query_lens if n > 1 for first in range(0, n, tokens_per_tile)]
    return np.asarray(seqs, dtype=np.int64), np.asarray(firsts, dtype=np.int64)


class EagerInputs:
    """Staging for steps run eagerly (prefill chunks, mixed batches, batches larger than every CUDA graph)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_width: int, device: torch.device) -> None:
        max_tokens = eager_token_bucket(max_tokens)  # room for the padding
        self.max_tokens, self.max_seqs, self.max_width = max_tokens, max_seqs, round_up(max_width, 16)
        # Tiles never outnumber tokens; sample rows never outnumber sequences; eleven segments, each padded.
        capacity = 6 * max_tokens + 4 * max_seqs + 1 + max_seqs * self.max_width + 11 * SEGMENT_ALIGNMENT
        self.staging = PinnedStaging(capacity)
        self.device_buffer = torch.zeros(capacity, dtype=torch.int32, device=device)

    def upload(
        self, host: HostStep, sample_index: list[int], sample_slots: list[int], tokens_per_tile: int
    ) -> DeviceStep:
        """Copy a step into the staging buffer and up to the device in one copy; returns the device views."""
        if host.num_tokens > self.max_tokens or host.num_seqs > self.max_seqs:
            raise ValueError(f"a step of {host.num_tokens} tokens / {host.num_seqs} sequences exceeds the staging size")
        tile_seq, tile_first = prefill_tile_arrays(host.query_lens, tokens_per_tile)
        fields = {
            "input_ids": host.input_ids,
            "sources": host.sources,
            "positions": host.positions,
            "slot_mapping": host.slot_mapping,
            "query_start_loc": host.query_start_loc,
            "context_lens": host.context_lens,
            "block_tables": host.block_tables.reshape(-1),
            "sample_index": np.asarray(sample_index, dtype=np.int64),
            "sample_slots": np.asarray(sample_slots, dtype=np.int64),
            "tile_seq": tile_seq,
            "tile_first": tile_first,
        }
        segments = Segments({name: len(values) for name, values in fields.items()})
        _, array = self.staging.acquire()
        for name, values in fields.items():
            segments.view(array, name)[:] = values
        self.staging.upload(segments.total, self.device_buffer)
        views = {name: segments.view(self.device_buffer, name) for name in fields}
        views["block_tables"] = views["block_tables"].view(host.num_seqs, -1)
        return DeviceStep(**views)


class GraphInputs:
    """The static input buffer of the decode CUDA graphs, one fixed layout for every batch-size bucket: row i of a
    bucket is a decode of one token; rows past the batch are padding (slot -1: no KV written; context 0: nothing
    attended)."""

    def __init__(self, max_batch: int, max_width: int, device: torch.device) -> None:
        self.max_batch, self.max_width = max_batch, round_up(max_width, 16)
        rows = max_batch
        self.segments = Segments(
            {
                "input_ids": rows,
                "sources": rows,
                "positions": rows,
                "slot_mapping": rows,
                "query_start_loc": rows + 1,
                "context_lens": rows,
                "sample_slots": rows,
                "block_tables": rows * self.max_width,
            }
        )
        self.staging = PinnedStaging(self.segments.total)
        self.buffer = torch.zeros(self.segments.total, dtype=torch.int32, device=device)
        # Before any step every row is padding (the capture runs on these values).
        self.segments.view(self.buffer, "sources").fill_(-1)
        self.segments.view(self.buffer, "slot_mapping").fill_(-1)
        self.segments.view(self.buffer, "query_start_loc").copy_(torch.arange(rows + 1, dtype=torch.int32))

    def views(self, bucket: int) -> DeviceStep:
        """The device tensors a bucket's graph reads (fixed at capture)."""
        seg, buf = self.segments, self.buffer
        return DeviceStep(
            input_ids=seg.view(buf, "input_ids")[:bucket],
            sources=seg.view(buf, "sources")[:bucket],
            positions=seg.view(buf, "positions")[:bucket],
            slot_mapping=seg.view(buf, "slot_mapping")[:bucket],
            query_start_loc=seg.view(buf, "query_start_loc")[: bucket + 1],
            context_lens=seg.view(buf, "context_lens")[:bucket],
            # The full width, whatever the step's: a graph keeps the strides it was captured with.
            block_tables=seg.view(buf, "block_tables")[: bucket * self.max_width].view(bucket, self.max_width),
        )

    def sample_slots(self, num: int) -> torch.Tensor:
        """The token-buffer slots of the last uploaded step's sampled rows ([num] int32, on the device)."""
        return self.segments.view(self.buffer, "sample_slots")[:num]

    def upload(self, host: HostStep, bucket: int, sample_slots: list[int]) -> None:
        """Write a decode step of `host.num_seqs` <= `bucket` rows, padded to `bucket`, into the static buffer, with
        the token-buffer slots its sampled rows write (`sample_slots`)."""
        num, seg = host.num_seqs, self.segments
        if host.num_tokens != num or num > bucket or host.block_tables.shape[1] > self.max_width:
            raise ValueError(f"not a decode step that fits bucket {bucket}: {num} sequences, {host.num_tokens} tokens")
        _, array = self.staging.acquire()
        for name, pad in (("input_ids", 0), ("sources", -1), ("positions", 0), ("slot_mapping", -1)):
            view = seg.view(array, name)
            view[:num] = getattr(host, name)
            view[num:bucket] = pad
        starts = seg.view(array, "query_start_loc")
        starts[: num + 1] = host.query_start_loc
        starts[num + 1 : bucket + 1] = np.arange(num + 1, bucket + 1)  # one token per padding row
        lens = seg.view(array, "context_lens")
        lens[:num] = host.context_lens
        lens[num:bucket] = 0
        seg.view(array, "sample_slots")[: len(sample_slots)] = sample_slots
        tables = seg.view(array, "block_tables").reshape(self.max_batch, self.max_width)
        tables[:num, : host.block_tables.shape[1]] = host.block_tables
        # Only the rows of this bucket travel: the segments before the tables are small.
        self.staging.upload(seg.offsets["block_tables"][0] + bucket * self.max_width, self.buffer)


def resolve_input_ids(input_ids: torch.Tensor, sources: torch.Tensor, token_buffer: torch.Tensor) -> torch.Tensor:
    """input_ids [T] (0 where pending), sources [T] (a token-buffer slot, or -1: keep), token_buffer [slots] int64:
    each running request's last sampled token. Returns [T] int64 ids, on the device, without a host round trip."""
    pending = token_buffer.index_select(0, sources.clamp(min=0))  # [T]
    return torch.where(sources >= 0, pending, input_ids.long())
