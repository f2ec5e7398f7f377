"""Exact, weight-folded smoothing of the MLP's outlier activations before quantization.

In a gated MLP the down projection reads ``act(gate(x)) * up(x)``, one channel per row of
``up``. Dividing row j of ``up`` by s_j and multiplying column j of ``down`` by s_j leaves the
model's function unchanged and the checkpoint standard (every exporter reads it), while the
activation the quantized ``down`` sees shrinks by s_j. With s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)
(SmoothQuant's rule) over the calibration tokens, the few channels that carry SmolLM2's
first-token activations (~3000 against a median of ~1) move into the weights, where their
column becomes the largest of its quantization block and is stored precisely.

Every s_j is rounded to a power of two, so the fold is exact in any floating dtype (bf16 and f16
checkpoints included): the transformed model computes bit for bit what the original does, and
``write_smoothed`` checks that on the calibration rows before anything uses it.

Measured on an SST-2 QLoRA fine-tune of SmolLM2-135M (benchmarks/quant_fidelity.py): see
``SMOOTHED_TYPES`` in export/gguf/tables.py and the ONNX settings in export/onnx/quantize.py.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError
from export.calibration import Calibration
from export.checkpoint import write_edited_copy

ALPHA = 0.5  # migration strength: 0.5 and 0.8 measured alike on SmolLM2 (int8 weights); 0.5 is SmoothQuant's default
MAX_SCALE_LOG2 = 12  # no channel is scaled by more than 2^12 either way
# By default (no --smooth) the fold is applied only to a model with massive activations: some
# down-projection input channel above MASSIVE_RATIO times its layer's median. Measured: SmolLM2-135M
# (2881 against ~1.2, ratio ~2400) gains (ONNX int8 KL -40%, q8_0 -12%); Gemma 3 270M (122 against
# 3.9, ratio 31) loses (q8_0 KL 0.0051 -> 0.0088 on its SST-2 rows).
MASSIVE_RATIO = 100.0
MAX_ROWS = 64  # calibration rows for the activation maxima (the outliers show in every row's first token)
# Which layers of a model with massive activations are folded (a table column per output type): "all" every
# decoder layer; "outlying" only the layers whose own largest down-projection input is at least LAYER_RATIO
# times that layer's median. Elsewhere the fold only moves rounding error from the activations into the weights.
# Measured for GGUF q4_k_m (imatrix) on the SmolLM2-135M SST-2 fine-tune, all 872 dev rows against the unmerged
# model (benchmarks/QUANTIZATION.md, "The full SST-2 dev set"; edgeft bench), mean KL / greedy answers equal to
# the reference's: no fold 0.0503 / 0.948; all 30 layers 0.0635 / 0.967; layers >= 20x (1, 2, 9, 10, 11, 27, 28,
# 29) 0.0536 / 0.975.
LAYER_SCOPES = ("all", "outlying")
LAYER_RATIO = 20.0

# model_type -> (name of the tensor whose rows produce the down projection's input, first row of
# the "up" half in it: 0 for a separate up_proj, the intermediate size for Phi-3's fused gate_up).
UP_TENSORS: dict[str, str] = {
    "llama": "mlp.up_proj.weight", "mistral": "mlp.up_proj.weight", "qwen2": "mlp.up_proj.weight",
    "qwen3": "mlp.up_proj.weight", "gemma3_text": "mlp.up_proj.weight", "gemma3": "mlp.up_proj.weight",
    "smollm3": "mlp.up_proj.weight", "phi3": "mlp.gate_up_proj.weight",
}
FUSED_GATE_UP = {"phi3"}
DOWN_TENSOR = "mlp.down_proj.weight"


def supports_smoothing(model_type: str) -> bool:
    return model_type in UP_TENSORS


def down_input_absmax(model: Any, calibration: Calibration, max_rows: int = MAX_ROWS) -> dict[int, Any]:
    """Layer index -> per-channel max |x| of the down projection's input over the calibration rows."""
    from export.massive_inputs import input_channel_max

    downs = {i: layer.mlp.down_proj for i, layer in enumerate(_layers(model))}
    return input_channel_max(model, downs, calibration.sequences[:max_rows])


def power_of_two_scales(act_max: Any, down_weight: Any, alpha: float = ALPHA) -> Any:
    """s_j = 2^round(log2(max|x_j|^alpha / max|W_:,j|^(1-alpha))), clamped to 2^±MAX_SCALE_LOG2."""
    import torch

    w_max = down_weight.detach().float().abs().amax(0).clamp(min=1e-8)
    ideal = act_max.clamp(min=1e-8) ** alpha / w_max ** (1 - alpha)
    exponent = torch.round(torch.log2(ideal)).clamp(-MAX_SCALE_LOG2, MAX_SCALE_LOG2)
    return torch.pow(2.0, exponent)


def fold_scales(tensors: dict[str, Any], prefix: str, scales: Any, model_type: str) -> None:
    """Divide the up rows by ``scales`` and multiply the down columns by them, in place, in each
    tensor's own dtype (exact: the scales are powers of two)."""
    up, down = tensors[f"{prefix}{UP_TENSORS[model_type]}"], tensors[f"{prefix}{DOWN_TENSOR}"]
    start = up.shape[0] - scales.numel() if model_type in FUSED_GATE_UP else 0
    rows = slice(start, start + scales.numel())
    up[rows] = (up[rows].float() / scales[:, None]).to(up.dtype)
    down.copy_((down.float() * scales[None, :]).to(down.dtype))


def _fold_all(tensors: dict[str, Any], smoothing: "Smoothing") -> None:
    for name in [n for n in tensors if n.endswith(DOWN_TENSOR)]:
        prefix = name[: -len(DOWN_TENSOR)]
        fold_scales(tensors, prefix, smoothing.scales[int(prefix.rstrip(".").rsplit(".", 1)[-1])], smoothing.model_type)


@dataclass
class Smoothing:
    """Per-layer power-of-two scales for the down projections' input channels, and what they do."""

    model_type: str
    alpha: float
    scales: dict[int, Any]  # layer index -> (intermediate,) float32 powers of two
    max_before: float
    max_after: float
    rows: int
    ratio: float = 0.0  # largest (channel max / layer median) of the down projections' inputs
    scope: str = "all"  # LAYER_SCOPES: which layers were given scales (the others keep 1)

    def massive(self) -> bool:
        return self.ratio >= MASSIVE_RATIO

    def record(self, calibration: Calibration, *, folded: bool) -> dict[str, Any]:
        """The record's ``smoothing``: what was folded (the fold is exact: outputs identical), or why
        nothing was, and the calibration rows either way."""
        if not folded:
            what = {"skipped": f"largest down-projection input {self.max_before:.1f} is {self.ratio:.0f}x its layer's "
                               f"median, under {MASSIVE_RATIO:.0f}x: no massive activations to move (--smooth forces it)"}
        else:
            what = {"method": "up/down channel smoothing, power-of-two scales folded into the weights",
                    "alpha": self.alpha, "layer_scope": self.scope,
                    "layers": sorted(i for i, s in self.scales.items() if bool((s != 1).any())),
                    "channels_scaled": sum(int((s != 1).sum()) for s in self.scales.values()),
                    "max_down_input_before": round(self.max_before, 2), "max_down_input_after": round(self.max_after, 2),
                    "calibration_rows": self.rows, "outputs_identical": True}
        return {**what, "ratio": round(self.ratio, 1), **calibration.describe()}


def measure_smoothing(model: Any, model_type: str, calibration: Calibration, alpha: float = ALPHA,
                      layers: str = "all") -> Smoothing:
    """Scales for the decoder layers of ``model`` (fp32, eval mode) from the calibration rows: every
    layer, or (``layers="outlying"``) only those at least LAYER_RATIO times their median."""
    import torch

    if not supports_smoothing(model_type):
        raise EdgeftError(f"--smooth: no smoothing rule for model type {model_type!r} "
                          f"(have: {', '.join(sorted(UP_TENSORS))})")
    if layers not in LAYER_SCOPES:
        raise EdgeftError(f"smoothing layers {layers!r}: expected one of {', '.join(LAYER_SCOPES)}")
    maxima = down_input_absmax(model, calibration)
    ratios = {i: float(m.max() / m.median().clamp(min=1e-8)) for i, m in maxima.items()}
    decoder = _layers(model)
    scales = {i: power_of_two_scales(maxima[i], decoder[i].mlp.down_proj.weight, alpha)
              if layers == "all" or ratios[i] >= LAYER_RATIO else torch.ones_like(maxima[i]) for i in maxima}
    before = max(float(m.max()) for m in maxima.values())
    after = max(float((maxima[i] / scales[i]).max()) for i in maxima)
    return Smoothing(model_type, alpha, scales, before, after, min(len(calibration.sequences), MAX_ROWS),
                     max(ratios.values()), layers)


def fold_into_model(model: Any, smoothing: Smoothing) -> None:
    """Fold the scales into a loaded model's weights, in place (exact: powers of two)."""
    import torch

    with torch.no_grad():
        _fold_all(model.state_dict(keep_vars=False), smoothing)


def smooth_model(model: Any, calibration: Calibration, alpha: float = ALPHA, *, forced: bool = False,
                 layers: str = "all") -> dict[str, Any]:
    """Measure the scales on ``calibration`` and fold them into ``model`` (fp32, eval mode) in place,
    unless (not ``forced``) the model has no massive activations; returns what was done and on which
    rows, for the record's quantizer settings."""
    smoothing = measure_smoothing(model, model.config.model_type, calibration, alpha, layers)
    if not forced and not smoothing.massive():
        return smoothing.record(calibration, folded=False)
    fold_into_model(model, smoothing)
    return smoothing.record(calibration, folded=True)


def write_smoothed(model_dir: Path, calibration: Calibration, dest: Path, alpha: float = ALPHA, *,
                   forced: bool = False, layers: str = "all") -> dict[str, Any]:
    """A copy of ``model_dir`` in ``dest`` with the smoothing folded into its weights (in their own
    dtype), checked to compute the same logits as the original on calibration rows; returns the
    record's ``smoothing``. Without ``forced``, a model with no massive activations is left alone
    (nothing written; the record says why)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, dest = Path(model_dir), Path(dest)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    smoothing = measure_smoothing(model, model_type, calibration, alpha, layers)
    if not forced and not smoothing.massive():
        return smoothing.record(calibration, folded=False)
    write_edited_copy(model_dir, dest, lambda tensors: _fold_all(tensors, smoothing))
    if not _same_logits(model, dest, calibration):
        raise EdgeftError("smoothing changed the model's outputs (a scale under- or overflowed the weights' dtype); "
                          "export with --no-smooth")
    return smoothing.record(calibration, folded=True)


def _same_logits(original: Any, smoothed_dir: Path, calibration: Calibration, rows: int = 4) -> bool:
    """The smoothed checkpoint's logits equal the original's (to fp32 rounding) on a few rows."""
    import torch
    from transformers import AutoModelForCausalLM

    smoothed = AutoModelForCausalLM.from_pretrained(str(smoothed_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        for ids in calibration.sequences[:rows]:
            x = torch.tensor([ids])
            a, b = original(input_ids=x).logits, smoothed(input_ids=x).logits
            if not math.isfinite(float(b.abs().max())) or float((a - b).abs().max()) > 1e-3 * max(1.0, float(a.abs().max())):
                return False
    return True


def _layers(model: Any) -> Any:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None) or getattr(getattr(base, "language_model", None), "layers", None)
    if layers is None:
        raise EdgeftError("smoothing: the model has no decoder layers it can find")
    return layers
