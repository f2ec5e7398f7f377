"""Which linear layers read massive activations: the input channel whose largest |x| dwarfs the layer's
median channel (SmolLM2-135M: ~3000 against ~1 at the first token of every row, in two or three
down projections).

Quantized kernels that quantize their activations too (onnxruntime's MatMulNBits at accuracy_level 4:
8 bits per block of the input) lose most where such a channel shares a block with ordinary ones, so an
int8 graph computes exactly these MatMuls on float activations (``export/onnx/quantize.py``,
``Int8Settings.float_massive_inputs``). The measurement runs on the PyTorch model that is exported (after
any smoothing), over the calibration rows when there are some and otherwise the verification's sample
texts: the massive channels appear at the first token of any text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

MAX_ROWS = 64  # token sequences measured (the channels show in every row's first token)
# A layer's input is massive at this ratio. SmolLM2-135M fine-tunes: the down projections of layers 11
# and 28 read 421-4511x (benchmarks/activation_outliers.py on the SST-2 and demo fine-tunes; the int8
# export's record, on calibration rows or on the sample texts alike), the next ones at most 102x;
# Gemma 3 270M's largest is 31x.
MASSIVE_INPUT_RATIO = 300.0


@dataclass(frozen=True)
class MassiveInputs:
    """Linear layers (module names) whose input reaches ``MASSIVE_INPUT_RATIO`` times its median channel."""

    layers: dict[str, float]  # module name -> largest channel max / median channel max
    sequences: int
    source: str  # "calibration rows" or "sample texts"

    def record(self, nodes: Sequence[str]) -> dict[str, Any]:
        return {"rule": f"input channel max >= {MASSIVE_INPUT_RATIO:g}x the median channel's",
                "layers": {k: round(v, 1) for k, v in self.layers.items()}, "nodes": list(nodes),
                "measured_on": f"{self.sequences} {self.source}"}


def massive_inputs(model: Any, sequences: Sequence[Sequence[int]], source: str,
                   ratio: float = MASSIVE_INPUT_RATIO) -> MassiveInputs:
    """Run ``model`` (PyTorch, eval mode) over up to ``MAX_ROWS`` of ``sequences`` and name the linear
    layers (inside the model, logits projection included) whose input has a channel ``ratio`` times
    its median channel."""
    import torch

    used = [list(s) for s in sequences[:MAX_ROWS] if s]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    peaks = input_channel_max(model, linears, used)
    ratios = {n: float(p.max() / p.median().clamp(min=1e-8)) for n, p in peaks.items()}
    return MassiveInputs({n: r for n, r in ratios.items() if r >= ratio}, len(used), source)


def input_channel_max(model: Any, modules: dict[Any, Any], sequences: Sequence[Sequence[int]]) -> dict[Any, Any]:
    """key -> per-channel max |x| (float32) of the input of ``modules[key]`` over ``sequences``, each run
    through ``model`` once."""
    import torch

    peaks: dict[Any, Any] = {}

    def hook(key: Any):
        def record(_module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0).float()
            peaks[key] = torch.maximum(peaks[key], x) if key in peaks else x
        return record

    handles = [m.register_forward_hook(hook(k)) for k, m in modules.items()]
    try:
        with torch.inference_mode():
            for ids in sequences:
                model(input_ids=torch.tensor([list(ids)]))
    finally:
        for h in handles:
            h.remove()
    return peaks
