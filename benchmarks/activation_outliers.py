"""Where a model's activation outliers are: per linear layer, the largest |input| over calibration
rows against that layer's median channel, and whether it sits at the first token.

These figures decide the outlier smoothing (``export/smoothing.py``: folded by default only where a
down-projection input reaches ``MASSIVE_RATIO`` times its layer's median).

    .venv/bin/python benchmarks/activation_outliers.py MODEL_DIR TRAIN.jsonl [--rows 32] [--min 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("calibration", type=Path)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--min", type=float, default=50.0, help="print layers whose largest input reaches this")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.calibration import load_calibration

    calib = load_calibration(a.calibration, AutoTokenizer.from_pretrained(str(a.model)))
    model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.float32).eval()
    peak: dict[str, torch.Tensor] = {}
    first: dict[str, float] = {}

    def hook(name: str):
        def record(_module, inputs, _output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs()
            peak[name] = torch.maximum(peak[name], x.amax(0)) if name in peak else x.amax(0)
            first[name] = max(first.get(name, 0.0), float(x[0].max()))
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(hook(name))
    with torch.inference_mode():
        for ids in calib.sequences[: a.rows]:
            model(input_ids=torch.tensor([ids]))
    print("| layer | max |x| | median channel | ratio | max at first token | top channels |\n|---|---|---|---|---|---|")
    for name, v in peak.items():
        if float(v.max()) >= a.min:
            median = float(v.median())
            print(f"| {name} | {float(v.max()):.1f} | {median:.2f} | {float(v.max()) / max(median, 1e-8):.0f} | "
                  f"{first[name]:.1f} | {torch.topk(v, 3).indices.tolist()} |")


if __name__ == "__main__":
    main()
