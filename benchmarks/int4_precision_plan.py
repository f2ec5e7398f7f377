"""Which decoder projections of ONNX int4 should stay at 8 bits: one GPTQ pass onto each grid, then every
plan measured against the same reference in one run.

The product's int4 (``export/onnx/quantize.py``, ``Int4Settings.higher_precision``) keeps some MatMuls at
8 bits. This benchmark rounds every decoder linear layer of the merged model by the product's GPTQ
(``export/gptq.py``, act-order, on the calibration rows) onto onnxruntime's symmetric 4-bit blocks and onto
its 8-bit blocks once each, then, for each plan (which projections take the 8-bit values), writes those
weights into the PyTorch model and compares it with the unquantized model on the evaluation rows as the
bench does (each distinct context once, from each row's last user turn on): mean KL and top-1 agreement,
the decoder's weight bytes (codes and fp32 block scales), and each plan's KL as a ratio of the current
default's in the same run. The logits projection, the embedding and onnxruntime's int8 activations are
left out (the same for every plan), so the absolute figures are lower than an export's verification; the
export itself (``edgeft export onnx --quantize int4 --eight-bit PATTERN``) is the check of a plan.

    .venv/bin/python benchmarks/int4_precision_plan.py [--model MERGED] [--calibration TRAIN.jsonl]
        [--eval-data DEV.jsonl] [--rows 96] [--near-default] [--out results/int4_precision_plan.json]

Defaults read what ``benchmarks/quant_fidelity.py --prepare-only`` leaves in its output directory.
Writes the table to stdout, and JSON plus a PNG (decoder MiB against mean KL) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QF = ROOT / "benchmarks" / "results" / "quant_fidelity"


def main() -> int:
    from export.evalrows import reference_summaries, torch_compared_logits
    from export.onnx.quantize import EIGHT_BIT_BLOCK, INT4

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=QF / "merged", help="merged model directory")
    ap.add_argument("--calibration", type=Path, default=QF / "data" / "train.jsonl")
    ap.add_argument("--eval-data", type=Path, default=QF / "data" / "dev-verify.jsonl")
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "int4_precision_plan.json")
    ap.add_argument("--near-default", action="store_true", help="measure only the default plan and the rungs above it")
    a = ap.parse_args()

    default = tuple(INT4.higher_precision)
    base = ("down_proj", "v_proj")  # the plan before k_proj joined the default
    plans = {"all 4-bit": ()}
    plans["down_proj + v_proj"] = base
    for extra in ("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"):
        plans[f"down_proj + v_proj + {extra}"] = base + (extra,)
    for extra in ("gate_proj", "up_proj"):  # the next rungs above the default
        plans[" + ".join(default + (extra,))] = default + (extra,)
    if a.near_default:
        plans = {name: kept for name, kept in plans.items() if set(default) < set(kept)}
    same = next((name for name, kept in plans.items() if set(kept) == set(default)), None)
    if same:
        plans[same + " (default)"] = plans.pop(same)
    else:
        plans[" + ".join(default) + " (default)"] = default

    model, tok, rounded, seconds = _round(a.model, a.calibration)
    bpw = {4: 4 + 32 / INT4.block_size, 8: 8 + 32 / EIGHT_BIT_BLOCK}  # bits per weight, with fp32 block scales
    seqs = _eval_rows(a.eval_data, tok, a.rows, a.model)
    reference = reference_summaries(seqs, lambda row: torch_compared_logits(model, row))
    results = []
    for name, kept in plans.items():
        mib = _apply(model, rounded, kept, bpw)
        kl, top1 = _compare(model, seqs, reference)
        results.append({"plan": name, "eight_bit": list(kept), "decoder_mib": round(mib, 1),
                        "mean_kl": round(kl, 5), "top1_agreement": round(top1, 4)})
        print(f"{name}: {mib:.1f} MiB, KL {kl:.4f}, top-1 {top1:.4f}", flush=True)
    ref_kl = next(r["mean_kl"] for r in results if r["plan"].endswith("(default)"))
    for r in results:
        r["kl_vs_default"] = round(r["mean_kl"] / ref_kl, 3) if ref_kl else None

    print(f"\n{a.model} ({len(seqs)} evaluation rows, {sum(len(r.ids) - 1 - r.compare_from for r in seqs)} "
          f"distinct contexts; "
          f"GPTQ onto both grids {seconds:.0f} s)\n")
    print("| 8-bit projections | decoder MiB | mean KL | KL / default | top-1 |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['plan']} | {r['decoder_mib']:.1f} | {r['mean_kl']:.4f} | {r['kl_vs_default']:.2f} | "
              f"{r['top1_agreement']:.4f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"model": str(a.model), "rows": len(seqs), "gptq_s": round(seconds, 1),
                               "results": results}, indent=2))
    tmp.replace(a.out)
    _plot(results, a.out.with_suffix(".png"), a.model.name)
    print(f"\nwrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


def _round(model_dir: Path, calibration: Path):
    """The fp32 model, its tokenizer, GPTQ's weights onto the 4- and 8-bit grids ({bits: {name: tensor}})."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.calibration import load_calibration
    from export.gptq import decoder_linears, gptq_weights, ort_symmetric
    from export.onnx.gptq import ACT_ORDER
    from export.onnx.quantize import EIGHT_BIT_BLOCK, INT4_AFTER_GPTQ

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    calib = load_calibration(calibration, tok)
    blocks = {4: INT4_AFTER_GPTQ.block_size, 8: EIGHT_BIT_BLOCK}  # the blocks int4's two passes write
    grids = {bits: ort_symmetric(bits, block) for bits, block in blocks.items()}
    names = sorted(set(decoder_linears(model, blocks[4])) & set(decoder_linears(model, blocks[8])))
    start = time.perf_counter()
    rounded = {bits: gptq_weights(model, calib, {n: grid for n in names}, grid.name, ACT_ORDER)[0]
               for bits, grid in grids.items()}
    return model, tok, rounded, time.perf_counter() - start


def _eval_rows(path: Path, tok, rows: int, model_dir: Path) -> list:
    """The first ``rows`` evaluation rows as the bench compares them (each distinct context once)."""
    from runtime.bench.evalset import eval_set

    return eval_set(tok, path, rows, 4, model_dir).rows


def _apply(model, rounded, kept: tuple[str, ...], bpw: dict[int, float]) -> float:
    """Write the 8-bit values into the projections named by ``kept`` (as the export matches them), 4-bit into
    the rest; decoder MiB."""
    import torch

    from export.onnx.quantize import higher_precision

    params = dict(model.named_parameters())
    bits_total = 0
    with torch.no_grad():
        for name in rounded[4]:
            bits = 8 if higher_precision(name, kept) else 4
            params[name].copy_(rounded[bits][name])
            bits_total += params[name].numel() * bpw[bits]
    return bits_total / 8 / 2**20


def _compare(model, rows, reference) -> tuple[float, float]:
    """(mean KL(reference || model), top-1 agreement) over every compared position, as the bench compares."""
    from export.evalrows import agreement_on_rows, torch_compared_logits

    m = agreement_on_rows(rows, reference, lambda row: torch_compared_logits(model, row))
    return m["mean_kl"], m["top1_agreement"]


def _plot(results, path: Path, title: str) -> None:
    from edgeft.plots import _pyplot, save_png

    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for r in results:
        if r["plan"] == "all 4-bit":
            continue  # off the scale of the others
        ax.scatter(r["decoder_mib"], r["mean_kl"], color="C3" if r["plan"].endswith("(default)") else "C0")
        ax.annotate(r["plan"].replace("down_proj + v_proj", "d+v"), (r["decoder_mib"], r["mean_kl"]), fontsize=7)
    ax.set_xlabel("decoder weights, MiB")
    ax.set_ylabel("mean KL vs fp32 (PyTorch)")
    ax.set_title(f"int4 GPTQ: projections kept at 8 bits ({title})")
    save_png(fig, path)


if __name__ == "__main__":
    sys.exit(main())
