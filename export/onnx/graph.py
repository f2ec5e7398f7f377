"""Graph edits the quantizers rely on, pure functions of an ONNX ModelProto: find and untie the logits
projection, store the embedding table as fp16, turn HQQ's float zero points into uint4 ones, and let
chosen MatMulNBits nodes compute on float activations."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def lm_head_node(model: Any) -> str | None:
    """Name of the MatMul that produces ``logits``."""
    for node in model.graph.node:
        if node.op_type == "MatMul" and "logits" in node.output:
            return node.name
    return None


def untie_lm_head(model: Any) -> str | None:
    """Give the logits MatMul its own (transposed) weight so a quantizer can see a constant B.

    optimum keeps tied embeddings as one initializer read through ``Transpose``; quantizers only
    touch MatMuls whose B is an initializer. Returns the MatMul's name (None if not found).
    """
    from onnx import numpy_helper

    name = lm_head_node(model)
    if name is None:
        return None
    node = next(n for n in model.graph.node if n.name == name)
    inits = {i.name: i for i in model.graph.initializer}
    if node.input[1] in inits:
        return name  # already a constant
    producer = next((n for n in model.graph.node if node.input[1] in n.output), None)
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
        return name
    weight = numpy_helper.to_array(inits[producer.input[0]])  # (V, H)
    new = numpy_helper.from_array(np.ascontiguousarray(weight.T), name="lm_head.weight")  # (H, V)
    model.graph.initializer.append(new)
    node.input[1] = new.name
    if not any(producer.output[0] in n.input for n in model.graph.node):
        model.graph.node.remove(producer)
    return name


def embedding_to_fp16(model: Any) -> str | None:
    """Store the token embedding table as fp16, with a Cast back to float after each lookup.

    The table is the largest 2-D float initializer read only by Gather (a tied lm_head still read
    through Transpose keeps it fp32). Returns its name, or None when there is none.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    tables = [i for i in graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
              and readers.get(i.name) and all(n.op_type == "Gather" and n.input[0] == i.name for n in readers[i.name])]
    if not tables:
        return None
    init = max(tables, key=lambda i: math.prod(i.dims))
    table = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
    graph.initializer.remove(init)
    graph.initializer.append(table)
    for gather in readers[init.name]:
        gather.input[0] = table.name
        out = gather.output[0]
        gather.output[0] = out + "_fp16"
        cast = helper.make_node("Cast", [gather.output[0]], [out], name=gather.name + "_to_float", to=TensorProto.FLOAT)
        graph.node.insert(list(graph.node).index(gather) + 1, cast)
    return init.name


FLOAT_ACCURACY_LEVEL = 0  # MatMulNBits accuracy_level unset: float activations (measured alike at 1, 2 and 3)


def module_scope(module: str) -> str:
    """The node-name prefix torch.onnx gives a PyTorch module: ``model.layers.11.mlp.down_proj`` ->
    ``/model/layers.11/mlp/down_proj/`` (a list index stays joined to its list by a dot)."""
    parts: list[str] = []
    for part in module.split("."):
        if part.isdigit() and parts:
            parts[-1] += "." + part
        else:
            parts.append(part)
    return "/" + "/".join(parts) + "/"


def compute_in_float(model: Any, modules: Any) -> list[str]:
    """Set the MatMulNBits nodes of ``modules`` (PyTorch module names) to float activations
    (``FLOAT_ACCURACY_LEVEL``); their weights stay as quantized. Returns the nodes changed."""
    scopes = [module_scope(m) for m in modules]
    changed = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and any(node.name.startswith(s) for s in scopes):
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = FLOAT_ACCURACY_LEVEL
            changed.append(node.name)
    return changed


def split_float_zero_points(model: Any, accuracy_level: int | None) -> int:
    """Rewrite 4-bit MatMulNBits nodes with float zero points into uint4 zero points plus an offset term.

    HQQ stores dequantised weights as ``s * (q - z)`` with a float ``z`` per block; onnxruntime's
    fast CPU kernels need integer zero points. With ``zi = round(z)``:
    ``s*(q - z) = s*(q - zi) + s*(zi - z)``, and the second term is constant within a block, so
    ``x @ W = MatMulNBits(x, q, s, zi) + blocksum(x) @ R`` with ``R[b, n] = s[n,b] * (zi[n,b] - z[n,b])``:
    shapes x (..., K), blocksum(x) (..., K/block), R (K/block, N). Exact up to float rounding.
    Returns how many nodes were rewritten.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[Any] = []
    block_sums: dict[tuple[str, int], str] = {}  # (input, block) -> blocksum output: q/k/v share one
    rewritten = 0
    for node in list(graph.node):
        nodes.append(node)
        zp = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        if zp is None or zp.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, bits, block = attrs["K"], attrs["bits"], attrs["block_size"]
        if bits != 4 or k % block:
            continue  # padded blocks would need a padded blocksum; leave such nodes as they are
        offset = _integer_zero_points(graph, node, inits[node.input[2]], zp, accuracy_level)
        nodes += _add_offset(graph, node, offset, block, block_sums)
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    return rewritten


def _integer_zero_points(graph: Any, node: Any, scale_init: Any, zp: Any, accuracy_level: int | None) -> np.ndarray:
    """Replace ``node``'s float zero points ``zp`` by packed uint4 ones (and set its accuracy level).

    Returns the per-block offset ``R`` that the rounding leaves out: (K/block, N).
    """
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    n, blocks = attrs["N"], attrs["K"] // attrs["block_size"]
    scale = numpy_helper.to_array(scale_init).astype(np.float32).reshape(n, blocks)
    zero = numpy_helper.to_array(zp).astype(np.float32).reshape(n, blocks)
    zi = np.clip(np.round(zero), 0, 15).astype(np.uint8)
    offset = np.ascontiguousarray((scale * (zi - zero)).T)  # (blocks, N)
    graph.initializer.remove(zp)
    zp_name = node.input[3] + "_u4"
    graph.initializer.append(numpy_helper.from_array(_pack_uint4(zi), zp_name))
    node.input[3] = zp_name
    for a in [a for a in node.attribute if a.name == "accuracy_level"]:
        node.attribute.remove(a)
    if accuracy_level:
        node.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
    return offset


def _pack_uint4(values: np.ndarray) -> np.ndarray:
    """(N, blocks) values 0..15 → (N, ceil(blocks / 2)) uint8, two per byte, low nibble first."""
    if values.shape[1] % 2:
        values = np.concatenate([values, np.zeros((values.shape[0], 1), np.uint8)], axis=1)
    return ((values[:, 0::2] & 0x0F) | ((values[:, 1::2] & 0x0F) << 4)).astype(np.uint8)


def _add_offset(graph: Any, node: Any, offset: np.ndarray, block: int,
                block_sums: dict[tuple[str, int], str]) -> list[Any]:
    """Nodes that add ``blocksum(x) @ offset`` to ``node``'s output, under the output's old name.

    The blocksum of an input is built once per (input, block) and remembered in ``block_sums``.
    """
    from onnx import helper, numpy_helper

    nodes: list[Any] = []
    x, blocks = node.input[0], offset.shape[0]
    if (x, block) not in block_sums:
        shape, axes = f"{node.name}_blocks_shape", f"{node.name}_blocks_axes"
        graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, blocks, block], np.int64), shape),
                                  numpy_helper.from_array(np.array([-1], np.int64), axes)])
        blocked, summed = f"{node.name}_blocks", f"{node.name}_blocksum"
        # Decoder projections read (batch, seq, K): reshape to (batch, seq, K/block, block), sum the block.
        nodes += [helper.make_node("Reshape", [x, shape], [blocked], name=blocked),
                  helper.make_node("ReduceSum", [blocked, axes], [summed], name=summed, keepdims=0)]
        block_sums[(x, block)] = summed
    offset_name, product = f"{node.name}_zp_offset", f"{node.name}_offset_mm"
    graph.initializer.append(numpy_helper.from_array(offset, offset_name))
    out = node.output[0]
    node.output[0] = out + "_nbits"
    nodes += [helper.make_node("MatMul", [block_sums[(x, block)], offset_name], [product], name=product),
              helper.make_node("Add", [node.output[0], product], [out], name=f"{node.name}_offset_add")]
    return nodes
