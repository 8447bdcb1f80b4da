"""A stack of session deltas folded into one delta, for calls that ship a history.

On ZeroGPU every call pickles the user's deltas into a forked worker, which applies them for
the call. Deltas record the *values* a session left (not differences), so applying a stack
in order leaves, at every position any of them touches, the value of the last delta that
touches it, and nothing elsewhere. One delta over the union of the footprints holding exactly
those values therefore gives bit-identical weights, and rollback stays exact (the undo log
keeps the weights that were there before).

The folded delta is also cheap to ship and to apply: its mask regions carry their flat
positions (int32), so reading and writing them is a gather and a scatter instead of boolean
indexing, and all its tensors live in one buffer that pickles as a single copy. It is folded
once per version, and a new session folds into the previous version's delta.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .delta import Delta, Patch, Region


@dataclass(frozen=True)
class FlatRegion(Region):
    """A rows or mask region read and written by index: a mask region also knows its flat
    positions (sorted int32), so `read` and `write` are an index_select and an index_copy_
    (the order boolean indexing uses) instead of boolean indexing, which is several times
    slower; rows are gathered and scattered along the first dimension the same way."""

    flat: torch.Tensor | None = None

    def _index(self, device) -> torch.Tensor:
        # int64, as index_select wants; made once per region and device, not per write
        cached = self.__dict__.get("_index_cache")
        if cached is None or cached.device != torch.device(device):
            source = self.rows if self.kind == "rows" else self.flat
            cached = source.to(device, torch.long)
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def read(self, param: torch.Tensor) -> torch.Tensor:
        data = param.detach()
        if self.kind == "rows":
            return data.index_select(0, self._index(data.device))
        if self.kind != "mask" or not data.is_contiguous():
            return super().read(param)
        return data.reshape(-1).index_select(0, self._index(data.device))

    def write(self, param: torch.Tensor, values: torch.Tensor) -> None:
        data = param.data
        values = values.to(data.device, data.dtype)
        if self.kind == "rows":
            data.index_copy_(0, self._index(data.device), values)
        elif self.kind == "mask" and data.is_contiguous():
            data.view(-1).index_copy_(0, self._index(data.device), values.reshape(-1))
        else:
            super().write(param, values)


def _flat_positions(region: Region) -> torch.Tensor:
    """The sorted flat (row-major) positions of a region, int64."""
    numel = int(np.prod(region.shape))
    if isinstance(region, FlatRegion):
        return region.flat.long()
    if region.kind == "dense":
        return torch.arange(numel)
    if region.kind == "rows":
        width = numel // region.shape[0]
        return (region.rows.long()[:, None] * width + torch.arange(width)).reshape(-1)
    unpacked = np.unpackbits(region.bits.numpy(), count=numel)
    return torch.from_numpy(np.flatnonzero(unpacked))


def _buffer_dtype(patches: list[Patch]) -> torch.dtype:
    """The patches' own dtype; float64 (which holds fp32, fp16 and bf16 values exactly, so the
    final cast to the parameter rounds the same way) when they disagree."""
    dtypes = {p.values.dtype for p in patches}
    return dtypes.pop() if len(dtypes) == 1 else torch.float64


def _fold_param(patches: list[Patch]) -> Patch:
    shape = patches[0].region.shape
    kinds = {p.region.kind for p in patches}
    if "dense" in kinds or kinds == {"rows"}:
        # Rows and dense regions stay what they are; the scratch is at most one tensor.
        region = patches[0].region
        for patch in patches[1:]:
            region = region.union(patch.region)
        scratch = torch.zeros(shape, dtype=_buffer_dtype(patches))
        for patch in patches:
            patch.region.write(scratch, patch.values)
        if region.kind == "rows":
            region = FlatRegion("rows", tuple(shape), rows=region.rows)
        return Patch(region, region.read(scratch))
    numel = int(np.prod(shape))
    scratch = torch.zeros(numel, dtype=_buffer_dtype(patches))
    touched = torch.zeros(numel, dtype=torch.bool)
    for patch in patches:  # later writes win, as on the model
        positions = _flat_positions(patch.region)
        scratch.index_copy_(0, positions, patch.values.reshape(-1).to(scratch.dtype))
        touched.index_fill_(0, positions, True)
    flat = torch.from_numpy(np.flatnonzero(touched.numpy()))
    bits = torch.from_numpy(np.packbits(touched.numpy()))
    region = FlatRegion("mask", tuple(shape), bits=bits, flat=flat.to(torch.int32))
    return Patch(region, scratch.index_select(0, flat))


class FoldedDelta(Delta):
    """A delta whose tensors are views into one bytearray: pickling copies that buffer once,
    and unpickling makes views into the received copy (no per-tensor work)."""

    def __reduce__(self):
        return (_rebuild, (self._layout, self._buffer))

    @staticmethod
    def pack(delta: Delta) -> FoldedDelta:
        parts, layout, size = [], [], 0

        def place(tensor: torch.Tensor | None):
            nonlocal size
            if tensor is None:
                return None
            tensor = tensor.detach().contiguous().cpu()
            start = size
            size += -(-tensor.numel() * tensor.element_size() // 8) * 8  # 8-byte aligned
            parts.append((start, tensor))
            return (start, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

        for name, patch in delta.items():
            region = patch.region
            layout.append(
                (
                    name,
                    region.kind,
                    tuple(region.shape),
                    place(region.rows),
                    place(region.bits),
                    place(getattr(region, "flat", None)),
                    place(patch.values),
                )
            )
        buffer = bytearray(size)
        view = memoryview(buffer)
        for start, tensor in parts:
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            view[start : start + raw.nbytes] = raw
        return _rebuild(layout, buffer)


def _rebuild(layout, buffer: bytearray) -> FoldedDelta:
    def take(spec):
        if spec is None:
            return None
        start, dtype, shape = spec
        dtype = getattr(torch, dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype, count=count, offset=start).reshape(shape)

    delta = FoldedDelta()
    for name, kind, shape, rows, bits, flat, values in layout:
        if kind in ("rows", "mask") and (flat is not None or rows is not None):
            region = FlatRegion(kind, shape, rows=take(rows), bits=take(bits), flat=take(flat))
        else:
            region = Region(kind, shape, rows=take(rows), bits=take(bits))
        delta[name] = Patch(region, take(values))
    delta._layout, delta._buffer = layout, buffer
    return delta


def fold(deltas: Sequence[Delta]) -> FoldedDelta:
    """One delta that writes exactly what applying `deltas` in order writes."""
    by_param: dict[str, list[Patch]] = {}
    for delta in deltas:
        for name, patch in delta.items():
            by_param.setdefault(name, []).append(patch)
    folded = Delta()
    for name, patches in by_param.items():
        # Rows and mask regions always take the indexed path, even from a single session.
        alone = len(patches) == 1 and patches[0].region.kind == "dense"
        folded[name] = patches[0] if alone else _fold_param(patches)
    return FoldedDelta.pack(folded)


class FoldCache:
    """The folded delta of one version of a history, kept until the history changes. A chat on
    the latest version ships one delta and folds nothing; a version one session further folds
    only that session into the kept delta."""

    def __init__(self):
        self._deltas: list[Delta] = []  # the stack folded
        self._folded: FoldedDelta | None = None
        self._lock = threading.Lock()

    def get(self, deltas: Sequence[Delta]) -> list[Delta]:
        """`deltas` as a list of at most one delta (empty for the base model)."""
        deltas = list(deltas)
        if not deltas:
            return []
        with self._lock:  # two calls of one tab at once fold once
            return self._get(deltas)

    def _get(self, deltas: list[Delta]) -> list[Delta]:
        same = len(self._deltas) <= len(deltas) and all(
            a is b for a, b in zip(self._deltas, deltas)
        )
        if same and len(self._deltas) == len(deltas):
            return [self._folded]
        if same and self._folded is not None:
            self._folded = fold([self._folded, *deltas[len(self._deltas) :]])
        else:
            self._folded = fold(deltas)
        self._deltas = deltas
        return [self._folded]
