"""Bytes of weights per artifact, read from file headers (no torch, no model load).

Two figures per artifact:

- ``total``: every weight tensor's bytes as stored (quantized blocks included);
- ``per_token``: the bytes one decode step must stream from memory. This is ``total`` less the
  input-embedding table when the logits use a separate output matrix: decoding gathers one row
  of that table per token. When embeddings are tied, the table is the output projection and is
  read whole. KV-cache reads and activations are left out; on a 64+128-token workload they are
  a few percent of a 135M model's weights (SmolLM2-135M: 46 KB of K/V per cached token in fp32).

The decode speed limit a memory-bound CPU can reach is then ``bandwidth / per_token`` tokens/s.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError

# GGUF metadata value types (gguf.GGUFValueType) -> fixed byte size; 8 = string, 9 = array.
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_UINT32 = 4
GGUF_EMBEDDING = "token_embd.weight"
GGUF_OUTPUT = "output.weight"

# ONNX ops that read one row of a table per token (embedding lookups).
_GATHER_OPS = {"Gather", "GatherBlockQuantized"}
# ONNX TensorProto element sizes in bits (onnx.TensorProto.DataType); 4-bit types pack two per byte.
_ONNX_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 16: 16,
              21: 4, 22: 4}


@dataclass(frozen=True)
class WeightBytes:
    total: int
    per_token: int
    source: str  # how the figure was obtained (for the report)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "per_token": self.per_token, "source": self.source}


# ---------------------------------------------------------------------------------------------
# GGUF


@dataclass(frozen=True)
class GgufTensor:
    name: str
    ggml_type: str  # GGMLQuantizationType name, e.g. "Q4_K"
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0  # from the start of the tensor data section


@dataclass(frozen=True)
class GgufHeader:
    file_type: str | None  # llama.cpp's general.file_type as a --type name: "f16", "q4_k_m", ...
    architecture: str | None
    tensors: list[GgufTensor]
    data_start: int = 0  # byte where the tensor data section begins (aligned after the header)

    @property
    def data_end(self) -> int:
        """The byte the last tensor's data ends at: the least size a whole file has."""
        return self.data_start + max((t.offset + t.nbytes for t in self.tensors), default=0)


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Tensor table and file type of a GGUF file, walking the header only.

    ``gguf.GGUFReader`` would decode the whole vocabulary into numpy views first (seconds for
    49k tokens); this skips metadata values it does not need.
    """
    import gguf

    path = Path(path)
    if path.stat().st_size == 0:  # mmap refuses an empty file
        raise EdgeftError(f"{path}: empty file, not a GGUF file")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            magic, _version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        except struct.error:
            raise EdgeftError(f"{path}: truncated GGUF header") from None
        if magic != gguf.GGUF_MAGIC:
            raise EdgeftError(f"{path}: not a GGUF file (bad magic)")
        pos = 24

        def string(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, p)
            return bytes(buf[p + 8: p + 8 + n]).decode("utf-8", "replace"), p + 8 + n

        def skip(vtype: int, p: int) -> int:
            if vtype in _GGUF_FIXED:
                return p + _GGUF_FIXED[vtype]
            if vtype == _GGUF_STRING:
                return p + 8 + struct.unpack_from("<Q", buf, p)[0]
            item, count = struct.unpack_from("<IQ", buf, p)  # array: item type, length, items
            p += 12
            if item in _GGUF_FIXED:
                return p + count * _GGUF_FIXED[item]
            for _ in range(count):
                p = skip(item, p)
            return p

        file_type: int | None = None
        arch: str | None = None
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        try:
            for _ in range(n_kv):
                key, pos = string(pos)
                (vtype,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                if key == "general.file_type" and vtype == _GGUF_UINT32:
                    (file_type,) = struct.unpack_from("<I", buf, pos)
                elif key == "general.alignment" and vtype == _GGUF_UINT32:
                    (alignment,) = struct.unpack_from("<I", buf, pos)
                elif key == "general.architecture" and vtype == _GGUF_STRING:
                    arch, _ = string(pos)
                pos = skip(vtype, pos)
            tensors = []
            for _ in range(n_tensors):
                name, pos = string(pos)
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
                pos += 4 + 8 * n_dims
                ttype, offset = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                qtype = gguf.GGMLQuantizationType(ttype)
                block, size = gguf.GGML_QUANT_SIZES[qtype]
                tensors.append(GgufTensor(name, qtype.name, tuple(int(d) for d in shape),
                                          math.prod(shape) // block * size, int(offset)))
        except (struct.error, ValueError, KeyError) as e:
            raise EdgeftError(f"{path}: unreadable GGUF header ({type(e).__name__}: {e})") from None
    alignment = max(1, alignment)
    data_start = -(-pos // alignment) * alignment
    return GgufHeader(_file_type_name(file_type), arch, tensors, data_start)


def check_gguf_complete(path: str | Path) -> GgufHeader:
    """The header of a GGUF file whose tensor data is all there; a truncated file is a one-line error."""
    header = read_gguf_header(path)
    size = Path(path).stat().st_size
    if size < header.data_end:
        raise EdgeftError(f"{path}: truncated GGUF: its tensor data ends at byte {header.data_end}, "
                          f"the file has {size} bytes; copy or export it again")
    return header


def _file_type_name(file_type: int | None) -> str | None:
    import gguf

    if file_type is None:
        return None
    try:
        name = gguf.LlamaFileType(file_type).name
    except ValueError:
        return f"file_type_{file_type}"
    return name.lower().removeprefix("mostly_").removeprefix("all_")


def gguf_weight_bytes(path: str | Path) -> tuple[WeightBytes, GgufHeader]:
    header = read_gguf_header(path)
    by_name = {t.name: t.nbytes for t in header.tensors}
    total = sum(by_name.values())
    gathered = by_name.get(GGUF_EMBEDDING, 0) if GGUF_OUTPUT in by_name else 0
    return WeightBytes(total, total - gathered, "GGUF tensor table"), header


# ---------------------------------------------------------------------------------------------
# ONNX


def onnx_weight_bytes(model_path: str | Path) -> WeightBytes:
    """Initializer bytes of an ONNX graph (external data counted by its recorded length).

    Falls back to the graph and data files' sizes when the ``onnx`` package is absent.
    """
    model_path = Path(model_path)
    try:
        import onnx
    except ImportError:
        files = [p for p in model_path.parent.iterdir() if p.name.startswith(model_path.name)]
        size = sum(p.stat().st_size for p in files)
        return WeightBytes(size, size, "file size (onnx package not installed)")
    model = onnx.load(str(model_path), load_external_data=False)
    sizes: dict[str, int] = {}
    for init in model.graph.initializer:
        sizes[init.name] = _initializer_bytes(init)
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in sizes:
                consumers.setdefault(name, []).append((node.op_type, i))
    gathered = sum(sizes[n] for n, uses in consumers.items()
                   if all(op in _GATHER_OPS and i == 0 for op, i in uses))
    total = sum(sizes.values())
    return WeightBytes(total, total - gathered, "ONNX initializers")


def _initializer_bytes(init: Any) -> int:
    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    if init.raw_data:
        return len(init.raw_data)
    bits = _ONNX_BITS.get(init.data_type, 32)
    return (math.prod(init.dims) * bits + 7) // 8


# ---------------------------------------------------------------------------------------------
# safetensors (merged directories): sizes only; the PyTorch back-end counts parameters itself


def safetensors_bytes(directory: str | Path) -> int:
    """Bytes of tensor data in the safetensors files of ``directory`` (headers excluded)."""
    total = 0
    for f in sorted(Path(directory).glob("*.safetensors")):
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise EdgeftError(f"{f}: truncated safetensors file")
            (n,) = struct.unpack("<Q", head)
        total += f.stat().st_size - 8 - n
    return total
