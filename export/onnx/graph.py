"""Graph edits the quantizers rely on, pure functions of an ONNX ModelProto: find and untie the logits
projection, store the embedding table as fp16, turn HQQ's float zero points into uint4 ones, let
chosen MatMulNBits nodes compute on float activations, and give the int8-compute ones their input at about
16 bits as two 8-bit rows (``two_pass_activations``)."""

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


INT8_ACCURACY_LEVEL = 4  # MatMulNBits accuracy_level of int8 compute: MLAS rounds each input row onto 8-bit blocks
INT8_STEPS = 127.0  # symmetric 8-bit: max |x| of a block maps to 127


def module_of(node_name: str) -> str:
    """The PyTorch module an exported node belongs to: ``/model/layers.0/self_attn/q_proj/MatMul_Q4`` ->
    ``model.layers.0.self_attn.q_proj`` (optimum names each node by its module path)."""
    parts = node_name.strip("/").split("/")
    return ".".join(parts[:-1])


def two_pass_activations(model: Any) -> list[str]:
    """Let the int8-compute MatMulNBits nodes see their input at about 16 bits, in one call each.

    At accuracy_level 4 MLAS rounds every input row onto 8-bit blocks of ``block_size`` (scale max|x|/127), the
    larger share of int8's disagreement (benchmarks/QUANTIZATION.md, "Why 8-bit stops near 96% top-1"). Here the
    input ``x`` is split in the graph into ``hi`` = that same rounding of ``x`` (which the kernel then
    reproduces exactly) and ``lo = x - hi`` (at most half a step), the two are stacked along the first axis, the
    node runs once on the stack (its weights read once: decode stays bandwidth-bound) and the halves are added:
    ``x @ W = hi @ W + lo @ W`` with only ``lo``'s much smaller rounding left. Weights and file size are
    unchanged. ``hi``/``lo`` are built once per input (q/k/v and gate/up share one). Nodes whose K is not a
    whole number of blocks are left as they are. Returns the nodes rewritten."""
    from onnx import helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    split_inputs: dict[tuple[str, int], str] = {}  # (input, block) -> stacked (hi; lo)
    nodes: list[Any] = []
    rewritten: list[str] = []
    for node in list(graph.node):
        nodes.append(node)
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        block = int(attrs.get("block_size", 0))
        if attrs.get("accuracy_level") != INT8_ACCURACY_LEVEL or not block or attrs["K"] % block:
            continue
        x = node.input[0]
        if (x, block) not in split_inputs:
            stacked, pre = _hi_lo(graph, node.name, x, block, opset)
            nodes[-1:-1] = pre  # before the node
            split_inputs[(x, block)] = stacked
        out = node.output[0]
        node.input[0] = split_inputs[(x, block)]
        node.output[0] = f"{node.name}_two_pass"
        halves = [f"{node.name}_hi_out", f"{node.name}_lo_out"]
        split = (helper.make_node("Split", [node.output[0]], halves, name=f"{node.name}_split", axis=0, num_outputs=2)
                 if opset >= 18 else helper.make_node("Split", [node.output[0]], halves, name=f"{node.name}_split", axis=0))
        nodes += [split, helper.make_node("Add", halves, [out], name=f"{node.name}_two_pass_add")]
        rewritten.append(node.name)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return rewritten


def _hi_lo(graph: Any, name: str, x: str, block: int, opset: int) -> tuple[str, list[Any]]:
    """Nodes computing ``concat([hi, lo], axis=0)`` of ``x`` (``two_pass_activations``); (its name, nodes)."""
    from onnx import helper, numpy_helper

    p, c = f"{name}_act", f"two_pass_{block}"  # node outputs; constants shared by every split of this block size
    consts = {f"{c}_block_shape": np.array([-1, block], np.int64), f"{c}_axes": np.array([-1], np.int64),
              f"{c}_steps": np.array(INT8_STEPS, np.float32), f"{c}_tiny": np.array(1e-30, np.float32)}
    have = {i.name for i in graph.initializer}
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items() if k not in have)
    reduce = (helper.make_node("ReduceMax", [f"{p}_abs", f"{c}_axes"], [f"{p}_max"], keepdims=1) if opset >= 18
              else helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_max"], axes=[-1], keepdims=1))
    nodes = [helper.make_node("Shape", [x], [f"{p}_shape"]),
             helper.make_node("Reshape", [x, f"{c}_block_shape"], [f"{p}_blocks"]),  # rows of K split into blocks
             helper.make_node("Abs", [f"{p}_blocks"], [f"{p}_abs"]),
             reduce,
             helper.make_node("Div", [f"{p}_max", f"{c}_steps"], [f"{p}_scale0"]),
             helper.make_node("Max", [f"{p}_scale0", f"{c}_tiny"], [f"{p}_scale"]),  # an all-zero block stays 0
             helper.make_node("Div", [f"{p}_blocks", f"{p}_scale"], [f"{p}_q"]),
             helper.make_node("Round", [f"{p}_q"], [f"{p}_qr"]),
             helper.make_node("Mul", [f"{p}_qr", f"{p}_scale"], [f"{p}_hi_blocks"]),
             helper.make_node("Reshape", [f"{p}_hi_blocks", f"{p}_shape"], [f"{p}_hi"]),
             helper.make_node("Sub", [x, f"{p}_hi"], [f"{p}_lo"]),
             helper.make_node("Concat", [f"{p}_hi", f"{p}_lo"], [f"{p}_stacked"], axis=0)]
    for i, n in enumerate(nodes):
        n.name = f"{p}_{i}_{n.op_type}"
    return f"{p}_stacked", nodes
