"""Session deltas: what a session changed, stored sparsely, applied and removed bit-exactly.

A delta records the *values* a session left at the positions it could touch (a region), not
differences: applying writes them, and removing writes back the values that were there before.
No floating-point arithmetic is involved either way, so rollback is exact on every device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

# Value dtypes a delta may carry; writing casts them to the parameter's own dtype.
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KINDS = ("rows", "mask", "dense")


class DeltaError(ValueError):
    """A delta that does not fit what it claims to change; nothing has been written."""


def all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite. A sum with a NaN or an infinity in it is never finite
    (IEEE arithmetic), so a finite sum settles it in one vectorised pass without temporaries,
    several times faster than an element-wise isfinite, which is paid on every GPU call that
    applies a history; a non-finite sum (bad values, or finite ones that overflow) takes the
    exact test."""
    if bool(torch.isfinite(values.sum())):
        return True
    return bool(torch.isfinite(values).all())


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

    def check(self, values: torch.Tensor, where: str) -> None:
        """Refuse a region or values that are malformed on their own (no parameter needed):
        a known kind, a real shape, row indices in range, sorted and unique, exactly one mask
        bit per entry, one finite value per position. Raises `DeltaError` naming `where`."""
        if self.kind not in KINDS:
            raise DeltaError(
                f"{where} has region kind {self.kind!r}; expected rows, mask or dense."
            )
        shape = self.shape
        if not (
            isinstance(shape, tuple)
            and 1 <= len(shape) <= 8
            and all(type(n) is int and 1 <= n < 2**31 for n in shape)
        ):
            raise DeltaError(f"{where} has an impossible shape {list(shape)!r}.")
        numel = math.prod(shape)  # Python ints: a crafted shape cannot overflow into a match
        if not isinstance(values, torch.Tensor) or values.dtype not in VALUE_DTYPES:
            got = getattr(values, "dtype", type(values).__name__)
            raise DeltaError(f"{where} holds values of type {got}; expected floating point.")
        if self.kind == "dense":
            expected = shape
            if self.rows is not None or self.bits is not None:
                raise DeltaError(f"{where} is dense but also carries row or mask indices.")
        elif self.kind == "rows":
            rows = self.rows
            if self.bits is not None or not isinstance(rows, torch.Tensor):
                raise DeltaError(f"{where} is a row region without its row indices.")
            if rows.dtype not in (torch.int32, torch.int64) or rows.dim() != 1:
                raise DeltaError(f"{where} has row indices of type {rows.dtype}, {rows.dim()}-D.")
            if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= shape[0]):
                raise DeltaError(
                    f"{where} names rows {int(rows.min())}..{int(rows.max())} of a tensor "
                    f"with {shape[0]} rows."
                )
            if len(rows) > 1 and not bool((rows[1:] > rows[:-1]).all()):
                raise DeltaError(f"{where} has repeated or unsorted row indices.")
            expected = (len(rows), *shape[1:])
        else:
            bits = self.bits
            if self.rows is not None or not isinstance(bits, torch.Tensor):
                raise DeltaError(f"{where} is a mask region without its mask bits.")
            if bits.dtype != torch.uint8 or bits.dim() != 1 or len(bits) != (numel + 7) // 8:
                raise DeltaError(
                    f"{where} has {bits.numel()} mask bytes ({bits.dtype}); a tensor of shape "
                    f"{list(shape)} needs {(numel + 7) // 8} bytes of uint8."
                )
            flat = np.unpackbits(bits.numpy())
            if flat[numel:].any():
                raise DeltaError(f"{where} has mask bits set past the end of its tensor.")
            expected = (int(flat[:numel].sum()),)
        if tuple(values.shape) != tuple(expected):
            raise DeltaError(
                f"{where} holds values of shape {list(values.shape)}; its region needs "
                f"{list(expected)}."
            )
        if values.numel() and not all_finite(values):
            raise DeltaError(f"{where} holds NaN or infinite values.")

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

    def check(self, param: torch.Tensor | None, where: str) -> None:
        """Everything `Region.check` refuses, and whether the patch fits `param`: present, of the
        same shape, and still finite once cast to the parameter's dtype (1e39 is inf in fp16)."""
        if param is None:
            raise DeltaError(f"{where} changes a parameter this model does not have.")
        if tuple(param.shape) != tuple(self.region.shape):
            raise DeltaError(
                f"{where} is for a tensor of shape {list(self.region.shape)}; this model's is "
                f"{list(param.shape)}."
            )
        self.region.check(self.values, where)
        if self.values.dtype != param.dtype and self.values.numel():
            if not all_finite(self.values.to(param.dtype)):
                raise DeltaError(f"{where} holds values too large for the model's {param.dtype}.")


Footprint = dict[str, Region]


class Delta(dict):
    """Parameter name (as in `Bundle.vision_state`) -> Patch."""

    @property
    def nbytes(self) -> int:
        return sum(patch.nbytes for patch in self.values())

    @property
    def changed_values(self) -> int:
        return sum(patch.values.numel() for patch in self.values())

    def check(self, state: Mapping[str, torch.Tensor], where: str = "a session") -> None:
        """Raise `DeltaError` unless every patch fits `state` exactly (see `Patch.check`)."""
        for name, patch in self.items():
            if not isinstance(name, str) or not isinstance(patch, Patch):
                raise DeltaError(f"{where} is not a list of parameter patches.")
            shown = name if len(name) <= 60 else name[:59] + "…"  # a crafted name can be huge
            patch.check(state.get(name), f"{where}, parameter {shown}")

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
    """Write a delta into the parameters; return what is needed to take it back exactly.
    The delta is checked against `state` first, and a failure part-way through (out of memory,
    say) writes back what was already written, so the weights are never left half-patched."""
    delta.check(state)
    return _write(state, delta)


def _write(state: Mapping[str, torch.Tensor], delta: Delta) -> UndoLog:
    """Write a checked delta; on any failure write back what was written, then raise."""
    undo: UndoLog = []
    try:
        for name, patch in delta.items():
            param = state[name]
            undo.append((name, patch.region, patch.region.read(param)))
            patch.region.write(param, patch.values)
    except BaseException:
        restore(state, undo)
        raise
    return undo


def restore(state: Mapping[str, torch.Tensor], undo: UndoLog) -> None:
    for name, region, values in reversed(undo):
        region.write(state[name], values)


def apply_stack(state: Mapping[str, torch.Tensor], deltas: Iterable[Delta]) -> UndoLog:
    """Apply deltas in order, all or nothing: every delta is checked before the first write, and
    any failure restores every tensor already touched before the error propagates."""
    deltas = list(deltas)
    for index, delta in enumerate(deltas, 1):
        if not isinstance(delta, Delta):
            raise DeltaError(f"session {index} has no delta.")
        delta.check(state, f"session {index}")
    undo: UndoLog = []
    try:
        for delta in deltas:
            undo.extend(_write(state, delta))
    except BaseException:
        restore(state, undo)
        raise
    return undo


@contextmanager
def applied(state: Mapping[str, torch.Tensor], deltas: Iterable[Delta]) -> Iterator[None]:
    """Run a block with a stack of deltas applied; the weights are exactly as before afterwards,
    also when applying fails (apply_stack then restores what it wrote before raising)."""
    undo: UndoLog = []
    try:
        undo = apply_stack(state, deltas)
        yield
    finally:
        restore(state, undo)
