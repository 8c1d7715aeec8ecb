"""Lazy tensors: weights described by where they live, computed only when written.

A checkpoint's weights are memory-mapped views of the file; the loader's transposes
and slices, the `to-fp16` cast and `fuse-packed-qkv`'s concatenation are recorded as
a small expression (views, elementwise maps, concatenations) instead of being
applied. Only the exporter pulls the bytes, one tensor at a time (in row blocks where
the expression allows), so peak memory stays about one tensor whatever the model's
size. Each tensor's mapping is unmapped once it is written: the file stays in the page
cache, but not in the process's memory.

Anything else that needs the numbers (a NumPy kernel, `np.asarray`) gets an ordinary
array through `__array__`, so code written for arrays keeps working. `track` lets a
test see every array materialised, to check that no more than one is alive at a time.
"""
from __future__ import annotations

import math
import mmap
import os
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ResourceError
from ..system_memory import available_memory

Shape = Tuple[int, ...]
ArrayLike = Union[np.ndarray, "LazyTensor"]
BLOCK_BYTES = 16 << 20                    # row blocks of about this size when a tensor is streamed
CHECK_MEMORY_BYTES = 64 << 20             # steps at least this big check the memory available first

_hooks: List[Callable[["LazyTensor", np.ndarray], None]] = []


@contextmanager
def track(callback: Callable[["LazyTensor", np.ndarray], None]) -> Iterator[None]:
    """Call `callback(tensor, array)` for every array a lazy tensor produces (whole or a row block)."""
    _hooks.append(callback)
    try:
        yield
    finally:
        _hooks.remove(callback)


def _produced(tensor: "LazyTensor", array: np.ndarray) -> np.ndarray:
    for hook in list(_hooks):
        hook(tensor, array)
    return array


def out_of_memory(what: str, nbytes: int) -> ResourceError:
    free = available_memory()
    have = f", {free / 2**20:,.0f} MiB available" if free is not None else ""
    return ResourceError(f"out of memory {what} ({nbytes / 2**20:,.0f} MiB needed{have})")


def ensure_memory(what: str, nbytes: int) -> None:
    """A one-line ResourceError now, rather than the kernel's OOM killer later, when `nbytes`
    clearly cannot be had (only checked for big steps: reading the limits costs a few file reads)."""
    if nbytes >= CHECK_MEMORY_BYTES:
        free = available_memory()
        if free is not None and nbytes > free:
            raise out_of_memory(what, nbytes)


def fold_blocks(x: "ArrayLike", fn: Callable[[np.ndarray], int]) -> int:
    """The sum of `fn(block)` over `x`'s row blocks (one whole array when `x` is not lazy),
    holding one block at a time: how a check reads a weight without copying it whole."""
    if not is_lazy(x):
        return fn(np.asarray(x))
    total = 0
    for block in x.blocks():
        total += fn(block)
        del block
    return total


def is_lazy(x) -> bool:
    return isinstance(x, LazyTensor)


def contiguous(x: ArrayLike) -> ArrayLike:
    """`np.ascontiguousarray` for arrays; lazy tensors are contiguous when they are written."""
    return x if isinstance(x, LazyTensor) else np.ascontiguousarray(x)


def materialize(x: ArrayLike) -> np.ndarray:
    """An ordinary array (a lazy tensor computed now)."""
    return x.materialize() if isinstance(x, LazyTensor) else np.asarray(x)


class LazyTensor:
    """An array known by shape and dtype whose contents are computed on demand."""

    __array_priority__ = 100

    def __init__(self, shape: Sequence[int], dtype, label: str = "tensor"):
        self.shape: Shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.label = label

    # ---- array metadata ---------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyTensor({self.label}: {self.dtype}{list(self.shape)})"

    # ---- lazy operations ----------------------------------------------------------------
    @property
    def T(self) -> "LazyTensor":
        return self.transpose()

    def transpose(self, *axes) -> "LazyTensor":
        axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
        return _View(self, "transpose", axes or None)

    def reshape(self, *shape) -> "LazyTensor":
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return _View(self, "reshape", shape)

    def __getitem__(self, key) -> "LazyTensor":
        return _View(self, "getitem", key)

    def astype(self, dtype, copy: bool = True) -> "LazyTensor":
        dtype = np.dtype(dtype)
        if dtype == self.dtype:
            return self
        return self.map(lambda a: a.astype(dtype), dtype, "astype")

    def map(self, fn: Callable[[np.ndarray], np.ndarray], dtype, what: str = "map") -> "LazyTensor":
        """`fn` applied when computed; it must be elementwise (so it can run on row blocks) and
        give `dtype` with the input's shape."""
        return _Map(self, fn, dtype, what)

    @staticmethod
    def concatenate(parts: Sequence[ArrayLike], axis: int = 0) -> "LazyTensor":
        return _Concat([p if isinstance(p, LazyTensor) else Constant(p) for p in parts], axis)

    # ---- computing ------------------------------------------------------------------------
    def _compute(self) -> np.ndarray:
        """The contents; may be a view of the mapped file (cheap when `_viewable`)."""
        raise NotImplementedError

    def _viewable(self) -> bool:
        """True when `_compute` only builds views (no bytes are read or copied)."""
        return False

    def _block(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of axis 0; only called when `_streamable`."""
        return self._compute()[start:stop]

    def _streamable(self) -> bool:
        return self._viewable()

    def _release(self) -> None:
        """Give back the resident pages this tensor's mapped sources touched."""

    def materialize(self) -> np.ndarray:
        """A new C-contiguous array holding the contents (never a view of the file)."""
        ensure_memory(f"computing {self.label}", self.nbytes if self._viewable() else 2 * self.nbytes)
        try:
            array = self._compute()
            if not (array.flags.owndata and array.flags.c_contiguous):
                array = np.array(array, order="C", copy=True)
        except MemoryError:
            raise out_of_memory(f"computing {self.label}", self.nbytes) from None
        finally:
            self._release()
        if array.shape != self.shape or array.dtype != self.dtype:     # a broken map function
            raise ValueError(f"{self.label}: computed {array.dtype}{list(array.shape)}, "
                             f"expected {self.dtype}{list(self.shape)}")
        return _produced(self, array)

    def blocks(self, max_bytes: Optional[int] = None) -> Iterator[np.ndarray]:
        """The contents in C order as contiguous arrays of whole rows of about `max_bytes`
        (default `BLOCK_BYTES`; the whole tensor at once where its expression cannot be split)."""
        max_bytes = BLOCK_BYTES if max_bytes is None else max_bytes
        row_bytes = self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes
        if not self._streamable() or self.ndim == 0 or self.nbytes <= max_bytes:
            yield self.materialize()
            return
        rows = max(1, max_bytes // max(row_bytes, 1))
        try:
            for start in range(0, self.shape[0], rows):
                stop = min(start + rows, self.shape[0])
                try:
                    block = np.ascontiguousarray(self._block(start, stop))
                except MemoryError:
                    raise out_of_memory(f"computing {self.label}", row_bytes * (stop - start)) from None
                yield _produced(self, block)
                del block
        finally:
            self._release()

    def __array__(self, dtype=None, copy=None):
        array = self.materialize()
        return array if dtype is None else array.astype(dtype, copy=False)


class Constant(LazyTensor):
    """An in-memory array as a lazy-tensor leaf (a part of a concatenation)."""

    def __init__(self, array: np.ndarray):
        array = np.asarray(array)
        super().__init__(array.shape, array.dtype, "constant")
        self.array = array

    def _compute(self) -> np.ndarray:
        return self.array

    def _viewable(self) -> bool:
        return True


class MappedRegion(LazyTensor):
    """A tensor stored raw (little-endian, C order) at `offset` in a file, read through a read-only
    memory mapping of just its bytes. The mapping lives while the tensor is being computed and is
    unmapped by `_release`, so its pages never accumulate in the process's memory."""

    def __init__(self, path: Union[str, os.PathLike], offset: int, shape: Sequence[int], dtype, label: str):
        super().__init__(shape, dtype, label)
        self.path, self.offset = os.fspath(path), int(offset)
        self._view: Optional[np.ndarray] = None

    def _compute(self) -> np.ndarray:
        if self._view is None:
            self._view = self._map()
        return self._view

    def _map(self) -> np.ndarray:
        if not self.nbytes:
            return np.zeros(self.shape, self.dtype)
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < self.offset + self.nbytes:   # reading past the end would be SIGBUS
                raise ResourceError(f"{self.path}: the file is shorter than when it was opened "
                                    f"(tensor {self.label} is gone)")
            mapping = mmap.mmap(f.fileno(), self.offset + self.nbytes - start, access=mmap.ACCESS_READ, offset=start)
        array = np.frombuffer(mapping, dtype=self.dtype, count=self.size, offset=self.offset - start)
        return array.reshape(self.shape)

    def _viewable(self) -> bool:
        return True

    def _release(self) -> None:
        self._view = None          # the mapping goes with the last view of it


class _View(LazyTensor):
    def __init__(self, parent: LazyTensor, op: str, arg):
        self.parent, self.op, self.arg = parent, op, arg
        if op == "reshape":
            shape = _reshaped(parent.shape, arg)
        else:   # NumPy works out the shape (and the errors) on a zero-stride stand-in: no memory
            shape = self._apply(np.broadcast_to(np.zeros((), parent.dtype), parent.shape)).shape
        super().__init__(shape, parent.dtype, parent.label)

    def _apply(self, array: np.ndarray) -> np.ndarray:
        if self.op == "transpose":
            return array.transpose(self.arg)
        if self.op == "reshape":
            return array.reshape(self.shape)
        return array[self.arg]

    def _compute(self) -> np.ndarray:
        return self._apply(self.parent._compute())

    def _viewable(self) -> bool:
        basic = self.op == "transpose" or (self.op == "getitem" and _basic_index(self.arg))
        return basic and self.parent._viewable()

    def _release(self) -> None:
        self.parent._release()


def _basic_index(key) -> bool:
    """Slices, ints, Ellipsis and None only: NumPy indexes with a view, not a copy."""
    keys = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (slice, int, np.integer)) for k in keys)


def _reshaped(shape: Shape, new: Sequence[int]) -> Shape:
    """The shape `reshape(new)` gives (one -1 inferred), or ValueError as NumPy would raise."""
    size = math.prod(shape)
    new = tuple(int(d) for d in new)
    if new.count(-1) > 1:
        raise ValueError("can only specify one unknown dimension")
    if -1 in new:
        known = math.prod(d for d in new if d != -1)
        if known == 0 or size % known:
            raise ValueError(f"cannot reshape array of size {size} into shape {new}")
        new = tuple(size // known if d == -1 else d for d in new)
    if math.prod(new) != size:
        raise ValueError(f"cannot reshape array of size {size} into shape {new}")
    return new


class _Map(LazyTensor):
    def __init__(self, parent: LazyTensor, fn: Callable[[np.ndarray], np.ndarray], dtype, what: str):
        super().__init__(parent.shape, dtype, parent.label)
        self.parent, self.fn, self.what = parent, fn, what

    def _compute(self) -> np.ndarray:
        return np.asarray(self.fn(self.parent._compute()), dtype=self.dtype)

    def _streamable(self) -> bool:
        return self.parent._streamable()

    def _block(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.fn(self.parent._block(start, stop)), dtype=self.dtype)

    def _release(self) -> None:
        self.parent._release()


class _Concat(LazyTensor):
    def __init__(self, parts: List[LazyTensor], axis: int):
        if not parts:
            raise ValueError("need at least one array to concatenate")
        shape = _concat_shape([p.shape for p in parts], axis)
        dtype = np.result_type(*[p.dtype for p in parts])
        super().__init__(shape, dtype, "+".join(p.label for p in parts))
        self.parts, self.axis = parts, axis % len(shape) if shape else 0

    def _compute(self) -> np.ndarray:
        return np.concatenate([p._compute() for p in self.parts], axis=self.axis)

    def _streamable(self) -> bool:
        return self.axis != 0 and all(p._streamable() for p in self.parts)

    def _block(self, start: int, stop: int) -> np.ndarray:
        return np.concatenate([p._block(start, stop) for p in self.parts], axis=self.axis)

    def _release(self) -> None:
        for p in self.parts:
            p._release()


def _concat_shape(shapes: List[Shape], axis: int) -> Shape:
    rank = len(shapes[0])
    if rank == 0 or any(len(s) != rank for s in shapes):
        raise ValueError("all the input arrays must have the same number of dimensions")
    axis %= rank
    for s in shapes[1:]:
        if any(a != b for i, (a, b) in enumerate(zip(s, shapes[0])) if i != axis):
            raise ValueError(f"concatenate: shapes {shapes} differ outside axis {axis}")
    return tuple(sum(s[axis] for s in shapes) if i == axis else d for i, d in enumerate(shapes[0]))


def concatenate(parts: Sequence[ArrayLike], axis: int = 0) -> ArrayLike:
    """`np.concatenate`, lazy when any part is (packing checkpoint weights reads nothing)."""
    if any(isinstance(p, LazyTensor) for p in parts):
        return LazyTensor.concatenate(parts, axis)
    return np.concatenate(parts, axis=axis)
