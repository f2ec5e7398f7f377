"""Resident memory of CPU training: what PyTorch and bitsandbytes leave behind, given back.

Three things held memory that a 4-bit run on CPU never uses again (each measured on
SmolLM2-135M-Instruct QLoRA, batch 4, by ``benchmarks/train_memory.py``):

- the memory-mapped weight file, kept alive by the few tensors that are views of it
  (``release_file_mappings``);
- glibc's heap: it raises its mmap threshold each time a large block is freed, after which the
  transient tensors of loading and of every step are carved from the heap, whose freed pages
  stay resident (``set_mmap_threshold``);
- a weight-sized cast after every 4-bit dequantization (``dequantize_in_compute_dtype``).

Everything here is a no-op where it does not apply (no glibc, fp32 compute, GPU tensors).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import platform
from typing import Any

# glibc's mallopt parameter for the size from which an allocation gets its own mapping.
_M_MMAP_THRESHOLD = -3
# While a model loads and is quantized, every fp32 weight passes through short-lived copies: a
# low threshold keeps them out of the heap, whose freed pages would stay resident.
LOAD_MMAP_THRESHOLD = 128 * 1024
# During steps, tensors from 2 MiB up (the widest activations) get their own mappings and the
# rest is reused from the heap. benchmarks/train_memory.py measures it against 32 MiB (where
# glibc's own policy settles) and 1 MiB: lower thresholds keep more of each step out of the heap
# but map and fault those pages anew every step, costing tokens/s.
STEP_MMAP_THRESHOLD = 2 * 1024 * 1024


def _glibc() -> Any:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def set_mmap_threshold(nbytes: int) -> None:
    """Allocations of ``nbytes`` and more get their own mapping, returned to the system on free.

    Setting it also stops glibc from raising the threshold by itself.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes))


def trim_heap() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_file_mappings(model: Any) -> None:
    """Let the memory-mapped weight file go after 4-bit quantization.

    safetensors weights are memory-mapped, and parameters stored in the file's dtype are views
    of the mapping. After quantization only the embeddings and norms are such views, yet they
    keep the whole mapping alive, and every page of it was read to quantize the linear layers:
    on SmolLM2-135M (an fp32 file), releasing it takes resident memory after loading from 1111
    to 604 MiB (benchmarks/train_memory.py), for 108 MiB of copied tensors. Copying the
    remaining views releases the mapping. The copies are read from the file rather
    than through the mapping, whose untouched pages (the embedding's) would otherwise be faulted
    in on top of the copy, doubling the spike.
    """
    mappings = _unmodified_file_mappings()
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen and p.dtype.is_floating_point and p.device.type == "cpu":
            seen.add(id(p))  # tied weights are one Parameter: copy it once
            p.data = _owned_copy(p.data, mappings)
    gc.collect()
    trim_heap()


def _unmodified_file_mappings() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of this process's mappings of ``*.safetensors`` files
    that hold no modified page, so reading the file gives exactly what the mapping shows."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return []
    found, current = [], None
    for ln in lines:
        head = ln.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's header line
            current = None
            if len(head) == 6 and head[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = [start, end, int(head[2], 16), head[5]]
                found.append(current)
        elif current is not None and head[:1] == ["Anonymous:"] and int(head[1]) != 0:
            found.remove(current)  # copy-on-write pages differ from the file
            current = None
    return [tuple(m) for m in found]


def _owned_copy(t: Any, mappings: list[tuple[int, int, int, str]]) -> Any:
    """A copy of ``t`` in ordinary memory; read from the file when ``t`` views a mapping of it."""
    import torch

    nbytes = t.numel() * t.element_size()
    ptr = t.data_ptr()
    for start, end, offset, path in mappings if t.is_contiguous() else []:
        if start <= ptr and ptr + nbytes <= end:
            out = torch.empty_like(t, memory_format=torch.contiguous_format)
            with open(path, "rb") as fh:
                fh.seek(offset + ptr - start)
                if fh.readinto(out.view(-1).view(torch.uint8).numpy()) == nbytes:
                    return out
    return t.clone()


def dequantize_in_compute_dtype(model: Any, dtype: Any) -> None:
    """Have every 4-bit layer dequantize straight into the compute dtype.

    bitsandbytes dequantizes into the dtype the weight had when it was quantized (fp32 here)
    and the layer then casts that copy to the compute dtype: two weight-sized temporaries per
    matmul, forward and backward. The kernels compute in fp32 and round once either way, so
    dequantizing into bf16 directly gives the same bits (tests/test_train.py checks it).
    """
    import torch

    if dtype == torch.float32:
        return
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "dtype", None) == torch.float32:
            state.dtype = dtype
