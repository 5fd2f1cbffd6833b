"""What loading a model leaves resident: hints to the operating system (Linux with glibc; elsewhere they do
nothing), and row reads that leave no pages of a file mapped."""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import threading
import weakref
from typing import Protocol

import torch


def _libc(symbol: str):
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6", use_errno=True), symbol)
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc("malloc_trim")
_MADVISE = _libc("madvise")
_MADV_RANDOM = 1
_PAGE = 4096


def advise_random_reads(t: torch.Tensor) -> None:
    """Tell the OS that the memory-mapped tensor `t` is read at random places (embedding rows looked up by
    token): without read-ahead a lookup reads its own pages from disk, not the read-ahead window around each
    row. (Pages already in the page cache as large folios, as a just-written file's can be, are mapped a
    whole folio at a time regardless.)"""
    if _MADVISE is None or t.numel() == 0:
        return
    start = t.data_ptr() // _PAGE * _PAGE
    end = t.data_ptr() + t.numel() * t.element_size()
    _MADVISE(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_RANDOM)  # a hint: errors ignored


def release_freed_heap() -> None:
    """Hand freed heap pages back to the OS. Converting weights at load frees large temporaries between the
    blocks it keeps; glibc would keep those pages resident (hundreds of MB for a 2B model)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


HUGEPAGES_ENV = "PYBITNET_HUGEPAGES"  # "0": streamed weights in ordinary memory (for comparisons)
_HUGE = 2 << 20  # a transparent huge page over 4 KB base pages (x86-64, arm64)
_CHUNK = 64 << 20  # weights up to a quarter of this share chunks; larger ones get a mapping each
_ALIGN = 64


def _huge_mapping(nbytes: int) -> torch.Tensor:
    """nbytes (uninitialized) at the start of an anonymous mapping whose whole huge pages are advised for
    transparent huge pages. Views of the tensor keep the mapping alive."""
    size = -(-nbytes // _HUGE) * _HUGE + _HUGE  # room to start on a huge-page boundary
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # private: shared anonymous memory is shmem, no THP
    base = torch.frombuffer(mm, dtype=torch.uint8)
    skip = -base.data_ptr() % _HUGE
    mm.madvise(mmap.MADV_HUGEPAGE, skip, size - skip)  # pages come at first touch, huge where possible
    return base[skip : skip + nbytes]


class _StreamedArena:
    """Bump allocation out of huge-page chunks: a model's weights live as long as the model, so no reuse. The
    arena lets go of its current chunk once every tensor carved from it is gone (a deleted model returns
    all its memory); a chunk lives on in its tensors' views either way."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunk: torch.Tensor | None = None
        self.used = self.live = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > _CHUNK // 4:
            return _huge_mapping(nbytes).view(dtype).view(shape)
        with self.lock:  # serializes takers; _release never takes it (see there)
            chunk = self.chunk
            if chunk is None or self.used + nbytes > _CHUNK:
                chunk = _huge_mapping(_CHUNK)
                self.chunk, self.used, self.live = chunk, 0, 0
            start, self.used = self.used, self.used + -(-nbytes // _ALIGN) * _ALIGN
            self.live += 1
        out = chunk[start : start + nbytes].view(dtype).view(shape)
        weakref.finalize(out, self._release, chunk.data_ptr())
        return out

    def _release(self, chunk_ptr: int) -> None:
        # Runs when a carved tensor dies, which a garbage collection inside take() can cause: no lock, and
        # take() works on its own reference to the chunk, so forgetting it here at any point is harmless.
        chunk = self.chunk
        if chunk is not None and chunk.data_ptr() == chunk_ptr:
            self.live -= 1
            if self.live == 0:
                self.chunk = None


_ARENA = _StreamedArena()


def streamed_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor (64-byte aligned) in memory backed by transparent huge pages
    where Linux offers them: for weights the CPU kernels stream every token, which on 4 KB pages cross a page
    (a TLB miss, and a stop for the hardware prefetchers) every 4 KB. Elsewhere, or with
    $PYBITNET_HUGEPAGES=0, ordinary memory."""
    shape = tuple(shape)
    if not hasattr(mmap, "MADV_HUGEPAGE") or os.environ.get(HUGEPAGES_ENV) == "0" or math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    return _ARENA.take(shape, dtype)


def streamed_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy of `t` in `streamed_empty` memory."""
    return streamed_empty(t.shape, t.dtype).copy_(t)


# With the C kernels the output head is a separate int8 copy (made from FileRows), so these float tensors are
# only looked up: a loader keeps 16-bit ones as stored, views of the mapped file, instead of float32 copies
LOOKED_UP = ("embed_tokens.weight", "lm_head.weight")


class RowReader(Protocol):
    def read_rows(self, name: str, start: int, stop: int | None): ...


class FileRows:
    """Row blocks of a float tensor of a checkpoint file, read with file I/O (as `dtype`), for building the
    int8 head (Transformer.build_int8_head): the same values as the mapped tensor, without its pages
    becoming resident in this process."""

    def __init__(self, reader: RowReader, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.reader, self.name, self.shape, self.dtype = reader, name, shape, dtype

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return torch.as_tensor(self.reader.read_rows(self.name, rows.start or 0, rows.stop)).to(self.dtype)
