"""Pickles read as untrusted: only numpy arrays and plain values come out, and nothing runs.

``pickle.load`` runs whatever callable a file names (``os.system``, ``Path.write_text``...), and even
numpy's own array globals are not safe to hand a crafted file: ``numpy.ndarray.__setstate__`` trusts
the state it is given (an object array that claims 100,000 items from a list of one reads past the
list and crashes the process). :func:`load` resolves numpy's array globals (``_reconstruct``,
``ndarray``, ``dtype``, and protocol 5's ``_frombuffer``) to stand-ins that check every state and
build the array themselves (``np.frombuffer`` on exactly the bytes the shape needs, or an object
array filled item by item), and refuses every other global before anything runs. Dicts, lists,
tuples, ints, floats, strings and bytes need no global at all.

Used by the CIFAR-10 python batches (fedse.data.readers) and PFLlib's split files
(fedse.data.split_import).
"""

from __future__ import annotations

import math
import pickle
from typing import IO, Any

import numpy as np

from ..config import short_repr

__all__ = ["GlobalRefused", "PickleRefused", "load"]


class PickleRefused(Exception):
    """A pickle that asks for something an array file never holds; the message says what."""


class GlobalRefused(PickleRefused):
    """A pickle naming a global other than numpy's array globals (nothing was run)."""

    def __init__(self, module: str, name: str) -> None:
        cut = lambda text: short_repr(text, 80).strip("'\"")  # noqa: E731
        self.global_name = f"{cut(module)}.{cut(name)}"
        super().__init__(f"the global {self.global_name}")


_NDARRAY = object()  # what the pickle's numpy.ndarray stands for: only ever an argument of _reconstruct
_DTYPE_CODES = {f"{k}{n}" for k in "iu" for n in (1, 2, 4, 8)} | {"f2", "f4", "f8", "b1", "O8"}


class _DtypeStub:
    """numpy.dtype(code, align, copy) then BUILD with its state (byte order at position 1)."""

    def __init__(self, code: str) -> None:
        self.dtype = np.dtype(code)

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) >= 2 else None
        if isinstance(order, bytes):  # a Python 2 pickle read with encoding="bytes"
            order = order.decode("latin1")
        if order not in ("<", ">", "|", "="):
            raise PickleRefused(f"a dtype state {short_repr(state, 80)}")
        if order in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(order)


def _dtype(code: Any, align: Any = False, copy: Any = True) -> _DtypeStub:
    if isinstance(code, bytes):  # a Python 2 pickle read with encoding="bytes"
        code = code.decode("latin1")
    if not isinstance(code, str) or code not in _DTYPE_CODES:
        raise PickleRefused(f"the dtype {short_repr(code, 40)} (allowed: {sorted(_DTYPE_CODES)})")
    return _DtypeStub(code)


def _shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 8 or not all(type(n) is int and n >= 0 for n in shape):
        raise PickleRefused(f"an array of shape {short_repr(shape, 80)}")
    return shape


def _from_bytes(data: Any, shape: tuple[int, ...], dt: np.dtype, order: str) -> np.ndarray:
    count = math.prod(shape)
    if isinstance(data, str):  # a Python 2 pickle's str
        data = data.encode("latin1")
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes) or len(data) != count * dt.itemsize:
        raise PickleRefused(f"array data that is not {count * dt.itemsize} bytes for shape {shape} of {dt}")
    return np.frombuffer(data, dtype=dt).reshape(shape, order=order)


class _ArrayStub:
    """numpy's ``_reconstruct(ndarray, (0,), b'b')`` then BUILD with ``(version, shape, dtype, fortran,
    data)``: the state is checked and the array made here (``np.frombuffer``, or an object array
    filled from a list of exactly its size), never by ``ndarray.__setstate__``."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise PickleRefused("an array state that is not (version, shape, dtype, fortran, data)")
        _, shape, dtype, fortran, data = state
        shape = _shape(shape)
        if not isinstance(dtype, _DtypeStub) or not isinstance(fortran, bool):
            raise PickleRefused(f"an array state with dtype {short_repr(dtype, 80)}")
        count, dt, order = math.prod(shape), dtype.dtype, "F" if fortran else "C"
        if dt.hasobject:
            if not isinstance(data, list) or len(data) != count:
                raise PickleRefused(f"an object array of {count} items rebuilt from {type(data).__name__} data")
            array = np.empty(count, dtype=object)
            for i, item in enumerate(data):
                array[i] = item
            self.array = array.reshape(shape, order=order)
            return
        self.array = _from_bytes(data, shape, dt, order)


def _reconstruct(subtype: Any, shape: Any, code: Any) -> _ArrayStub:
    if subtype is not _NDARRAY or shape != (0,):
        raise PickleRefused("an array reconstructed other than as numpy pickles arrays")
    return _ArrayStub()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _ArrayStub:
    """Protocol 5's ``numpy._core.numeric._frombuffer(buffer, dtype, shape, order)``."""
    if not isinstance(dtype, _DtypeStub) or dtype.dtype.hasobject or order not in ("C", "F"):
        raise PickleRefused(
            f"an array from a buffer with dtype {short_repr(dtype, 40)} and order {short_repr(order, 10)}"
        )
    stub = _ArrayStub()
    stub.array = _from_bytes(buffer, _shape(shape), dtype.dtype, order)
    return stub


_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5, numpy 1.x
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,  # protocol 5, numpy 2
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
}
ALLOWED = sorted(f"{m}.{n}" for m, n in _GLOBALS)


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves numpy's array globals to the stand-ins above, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        raise GlobalRefused(module, name)


def _plain(value: Any, depth: int = 0) -> Any:
    """The unpickled value with every array stand-in replaced by its array; a 0-d object array (what
    ``np.savez(data=dict)`` stores) by its item."""
    if depth > 6:
        raise PickleRefused("values nested deeper than a dict of arrays")
    if isinstance(value, _ArrayStub):
        if value.array is None:
            raise PickleRefused("an array without its state")
        if not value.array.dtype.hasobject:
            return value.array
        if value.array.ndim:
            raise PickleRefused("an array of Python objects")
        return _plain(value.array[()], depth + 1)
    if isinstance(value, dict):
        return {k: _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, depth + 1) for v in value]
    if value is None or isinstance(value, str | bytes | int | float):
        return value
    raise PickleRefused(f"a {type(value).__name__}")


def load(handle: IO[bytes], *, encoding: str = "latin1") -> Any:
    """The pickle in ``handle`` as plain values and numpy arrays (tuples become lists). A refused
    global or state is a :class:`PickleRefused` (:class:`GlobalRefused` for a global); a truncated
    or garbled pickle raises what the unpickler raises."""
    return _plain(_ArrayUnpickler(handle, encoding=encoding).load())
