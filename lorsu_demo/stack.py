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

On ZeroGPU even one pickled copy is too much at LLaVA scale (about 0.5 GB for five ViT-L
sessions: seconds per call to pickle and unpickle). So a version's folded delta can be
*shared*: written once as a safetensors file in a private folder (in /dev/shm where there
is room), after which the delta pickles as its path and a token, and the forked worker
memory-maps the file (`safetensors.safe_open`, no copy) instead of receiving the bytes. The
file is deleted when the server's last reference to the delta goes (calls in flight hold one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .delta import Delta, DeltaError, Patch, Region
from .history import History, HistoryError

SHARED_FORMAT = "lorsu-folded-delta/1"


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
        shared = self.__dict__.get("_shared")
        if shared is not None:  # a path and a token: the worker maps the file
            return (open_shared, shared)
        return (_rebuild, (self._layout, self._buffer))

    @property
    def shared_path(self) -> str | None:
        shared = self.__dict__.get("_shared")
        return None if shared is None else shared[0]

    def share(self, directory: str | os.PathLike | None = None) -> FoldedDelta:
        """This delta written once as a safetensors file, returned as a delta read from that
        file (memory-mapped) that pickles as (path, token). The file goes when the returned
        delta is garbage collected in this process (not in a forked child)."""
        if self.__dict__.get("_shared") is not None:
            return self
        from safetensors.torch import save_file

        tensors, params = {}, []
        for index, (name, patch) in enumerate(self.items()):
            region = patch.region
            parts = {
                "rows": region.rows,
                "bits": region.bits,
                "flat": getattr(region, "flat", None),
                "values": patch.values,
            }
            present = []
            for part, tensor in parts.items():
                if tensor is not None:
                    tensors[f"{index}.{part}"] = tensor.contiguous()
                    present.append(part)
            params.append([name, region.kind, list(region.shape), present])
        token = uuid.uuid4().hex
        metadata = {"format": SHARED_FORMAT, "token": token, "params": json.dumps(params)}
        folder = shared_dir(self.nbytes)
        path = folder / f"fold-{token}.safetensors"
        partial = path.with_suffix(".partial")
        try:
            save_file(tensors, str(partial), metadata=metadata)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        shared = open_shared(str(path), token)
        weakref.finalize(shared, _remove, str(path), os.getpid())
        return shared

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


def _remove(path: str, owner: int) -> None:
    """Delete a shared file, only in the process that wrote it (a forked worker inherits the
    finalizer and must not delete the server's file when it exits)."""
    if os.getpid() == owner:
        try:
            os.unlink(path)
        except OSError:
            pass


def shared_dir(needed: int = 0) -> Path:
    """The private folder (mode 0700) for shared folded deltas: LORSU_SHARED_DIR, else
    /dev/shm (memory, nothing touches a disk) when it has room for `needed` bytes and a
    margin, else the system's temporary folder (the page cache keeps a fresh file in memory
    there too)."""
    chosen = os.environ.get("LORSU_SHARED_DIR")
    if not chosen:
        user = os.getuid() if hasattr(os, "getuid") else "user"
        chosen = os.path.join(tempfile.gettempdir(), f"lorsu-shared-{user}")
        shm = "/dev/shm"
        if os.path.isdir(shm) and os.access(shm, os.W_OK):
            try:
                free = shutil.disk_usage(shm).free
            except OSError:
                free = 0
            if free >= 2 * needed + (256 << 20):
                chosen = os.path.join(shm, f"lorsu-shared-{user}")
    folder = Path(chosen)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def open_shared(path: str, token: str) -> FoldedDelta:
    """The folded delta in a shared file, memory-mapped (nothing is copied until it is
    applied). Refuses a file that is not the one meant: another format or another token."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt")
    except Exception as err:  # OSError, or safetensors' own error for a damaged file
        raise DeltaError(
            f"The shared copy of this history ({path}) cannot be read: {err}. Try again; "
            "the server writes it anew when the history changes."
        ) from None
    with handle as reader:
        metadata = reader.metadata() or {}
        if metadata.get("format") != SHARED_FORMAT or metadata.get("token") != token:
            raise DeltaError(f"{path} is not the shared history this call was given.")
        params = json.loads(metadata["params"])
        delta = FoldedDelta()
        for index, (name, kind, shape, present) in enumerate(params):
            parts = {part: reader.get_tensor(f"{index}.{part}") for part in present}
            shape = tuple(shape)
            if kind in ("rows", "mask") and ("flat" in parts or "rows" in parts):
                region = FlatRegion(
                    kind, shape, rows=parts.get("rows"), bits=parts.get("bits"),
                    flat=parts.get("flat"),
                )  # fmt: skip
            else:
                region = Region(kind, shape, rows=parts.get("rows"), bits=parts.get("bits"))
            delta[name] = Patch(region, parts["values"])
    delta._shared = (path, token)
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


def sharing_default() -> bool:
    """Share folded deltas through files where calls are pickled into forked workers: on
    ZeroGPU (SPACES_ZERO_GPU), or when LORSU_SHARED_DIR names a folder for them."""
    zero = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true", "yes")
    return zero or bool(os.environ.get("LORSU_SHARED_DIR"))


class FoldCache:
    """The folded deltas of the versions of one history lately used (the latest two), kept
    until the history changes. A chat on a kept version ships one delta and folds nothing; a
    version one session further folds only that session into the kept delta of its prefix.

    `share` (default: `sharing_default()` at each fold) writes each folded version once as a
    file that calls reference instead of carrying it (see `FoldedDelta.share`)."""

    KEEP = 2

    def __init__(self, share: bool | None = None):
        self._kept: list[tuple[list[Delta], FoldedDelta]] = []  # most recently used first
        self._share = share
        self._lock = threading.Lock()

    def get(self, deltas: Sequence[Delta]) -> list[Delta]:
        """`deltas` as a list of at most one delta (empty for the base model)."""
        deltas = list(deltas)
        if not deltas:
            return []
        with self._lock:  # two calls of one tab at once fold once
            return [self._get(deltas)]

    def _get(self, deltas: list[Delta]) -> FoldedDelta:
        best, start = None, 0
        for entry in self._kept:
            stack, folded = entry
            prefix = len(stack) <= len(deltas) and all(a is b for a, b in zip(stack, deltas))
            if prefix and len(stack) == len(deltas):
                self._kept.remove(entry)
                self._kept.insert(0, (stack, self._shared(folded)))
                return self._kept[0][1]
            if prefix and len(stack) > start:
                best, start = folded, len(stack)
        folded = self._shared(fold([best, *deltas[start:]] if best is not None else deltas))
        self._kept.insert(0, (deltas, folded))
        del self._kept[self.KEEP :]  # a dropped version's file goes with its last reference
        return folded

    def _shared(self, folded: FoldedDelta) -> FoldedDelta:
        """`folded` shared through a file when sharing is on (once: a shared one is kept)."""
        share = sharing_default() if self._share is None else self._share
        return folded.share() if share else folded

    def for_call(self, history: History) -> History:
        """`history` as a GPU call takes it: a `FoldedHistory` (its latest version folded,
        shared where sharing is on, and no per-session deltas), or `history` itself when it
        has no sessions."""
        if not history.sessions:
            return history
        return FoldedHistory.of(history, self.get(history.deltas()))


@dataclass
class FoldedHistory(History):
    """A history as a GPU call ships it: every record without its delta (accuracies, carried
    state, readers and the rest as they are) and the whole stack as one folded delta, which
    `deltas()` returns. Only the latest version is there: `deltas(upto)` of an earlier one is
    refused. Sessions run on it exactly as on the full history (bit-identical weights)."""

    folded: list[Delta] = field(default_factory=list)

    @staticmethod
    def of(history: History, folded: list[Delta]) -> FoldedHistory:
        empty = Delta()
        return FoldedHistory(
            model=history.model,
            base=history.base,
            sessions=[replace(record, delta=empty) for record in history.sessions],
            folded=list(folded),
        )

    def deltas(self, upto: int | None = None) -> list[Delta]:
        upto = len(self.sessions) if upto is None else upto
        self._check_index(upto)
        if upto != len(self.sessions):
            raise HistoryError(
                f"This copy of the history carries only its latest version (session "
                f"{len(self.sessions)}), not session {upto}."
            )
        return list(self.folded)
