"""Session deltas: what a session changed, stored sparsely, applied and removed bit-exactly.

A delta records the *values* a session left at the positions it could touch (a region), not
differences: applying writes them, and removing writes back the values that were there before.
No floating-point arithmetic is involved either way, so rollback is exact on every device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Region:
    """Positions of one parameter: some rows, a boolean mask of entries, or the whole tensor."""

    kind: str  # "rows" | "mask" | "dense"
    shape: tuple[int, ...]
    rows: torch.Tensor | None = None  # int32 row indices, for kind "rows"
    bits: torch.Tensor | None = None  # packed uint8 mask bits, for kind "mask"

    @staticmethod
    def dense(shape) -> Region:
        return Region("dense", tuple(shape))

    @staticmethod
    def of_rows(shape, rows) -> Region:
        rows = torch.as_tensor(sorted(set(int(r) for r in rows)), dtype=torch.int32)
        return Region("rows", tuple(shape), rows=rows)

    @staticmethod
    def of_mask(mask: torch.Tensor) -> Region:
        packed = np.packbits(mask.detach().to("cpu", torch.bool).numpy().reshape(-1))
        return Region("mask", tuple(mask.shape), bits=torch.from_numpy(packed))

    def mask(self, device=None) -> torch.Tensor:
        """The region as a boolean tensor of the parameter's shape."""
        if self.kind == "dense":
            return torch.ones(self.shape, dtype=torch.bool, device=device)
        if self.kind == "rows":
            mask = torch.zeros(self.shape, dtype=torch.bool, device=device)
            mask[self.rows.long().to(mask.device)] = True
            return mask
        numel = int(np.prod(self.shape))
        flat = np.unpackbits(self.bits.numpy(), count=numel).astype(bool)
        return torch.from_numpy(flat).reshape(self.shape).to(device)

    @property
    def size(self) -> int:
        if self.kind == "dense":
            return int(np.prod(self.shape))
        if self.kind == "rows":
            return len(self.rows) * int(np.prod(self.shape[1:]))
        return int(np.unpackbits(self.bits.numpy(), count=int(np.prod(self.shape))).sum())

    @property
    def index_bytes(self) -> int:
        index = self.rows if self.kind == "rows" else self.bits
        return 0 if index is None else index.numel() * index.element_size()

    def read(self, param: torch.Tensor) -> torch.Tensor:
        data = param.detach()
        if self.kind == "dense":
            return data.clone()
        if self.kind == "rows":
            return data[self.rows.long().to(data.device)].clone()
        return data[self.mask(data.device)].clone()

    def write(self, param: torch.Tensor, values: torch.Tensor) -> None:
        data = param.data
        values = values.to(data.device, data.dtype)
        if self.kind == "dense":
            data.copy_(values)
        elif self.kind == "rows":
            data[self.rows.long().to(data.device)] = values
        else:
            data[self.mask(data.device)] = values

    def union(self, other: Region) -> Region:
        if self.shape != other.shape:
            raise ValueError("regions of different shapes")
        if "dense" in (self.kind, other.kind):
            return Region.dense(self.shape)
        if self.kind == other.kind == "rows":
            return Region.of_rows(self.shape, self.rows.tolist() + other.rows.tolist())
        return Region.of_mask(self.mask() | other.mask())


@dataclass(frozen=True)
class Patch:
    region: Region
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.region.index_bytes


Footprint = dict[str, Region]


class Delta(dict):
    """Parameter name (as in `Bundle.vision_state`) -> Patch."""

    @property
    def nbytes(self) -> int:
        return sum(patch.nbytes for patch in self.values())

    @property
    def changed_values(self) -> int:
        return sum(patch.values.numel() for patch in self.values())

    @staticmethod
    def read(state: Mapping[str, torch.Tensor], footprint: Footprint) -> Delta:
        """The current values of `state` at `footprint`, as a CPU delta."""
        return Delta(
            {
                name: Patch(region, region.read(state[name]).cpu())
                for name, region in footprint.items()
            }
        )


UndoLog = list[tuple[str, Region, torch.Tensor]]


def snapshot(state: Mapping[str, torch.Tensor], footprint: Footprint) -> UndoLog:
    return [(name, region, region.read(state[name])) for name, region in footprint.items()]


def apply(state: Mapping[str, torch.Tensor], delta: Delta) -> UndoLog:
    """Write a delta into the parameters; return what is needed to take it back exactly."""
    undo: UndoLog = []
    for name, patch in delta.items():
        param = state[name]
        undo.append((name, patch.region, patch.region.read(param)))
        patch.region.write(param, patch.values)
    return undo


def restore(state: Mapping[str, torch.Tensor], undo: UndoLog) -> None:
    for name, region, values in reversed(undo):
        region.write(state[name], values)


def apply_stack(state: Mapping[str, torch.Tensor], deltas: Iterable[Delta]) -> UndoLog:
    undo: UndoLog = []
    for delta in deltas:
        undo.extend(apply(state, delta))
    return undo


@contextmanager
def applied(state: Mapping[str, torch.Tensor], deltas: Iterable[Delta]) -> Iterator[None]:
    """Run a block with a stack of deltas applied; the weights are exactly as before afterwards."""
    undo = apply_stack(state, deltas)
    try:
        yield
    finally:
        restore(state, undo)
