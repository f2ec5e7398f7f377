"""ONNX int4 recipes on one merged model, judged on its evaluation rows: which 4-bit quantizer, and which
MatMuls stay at 8 bits.

Exports the merged model to fp32 ONNX once (edgeft's own export), then writes each recipe from that graph
with ``export.onnx.quantize.quantize_int4`` (same logits projection, embedding and int8 compute for all)
and compares it with the merged PyTorch model in fp32 on the evaluation rows: top-1 agreement and mean KL
from each row's last user turn on, task accuracy of greedy answers, answers equal to the reference's,
size. Recipes:

  hqq, rtn, k_quant          every transformer MatMul at 4 bits with that quantizer
  k_quant+down, k_quant+down+v   k_quant with every down_proj (and v_proj) at 8 bits
  hqq+down+v                 HQQ with every down_proj and v_proj at 8 bits (edgeft's default int4)
  gptq                       onnxruntime's GPTQ, calibrated on --calibration (slow: it runs the model once per distinct MatMul input)
  gptq+down+v                the same, every down_proj and v_proj at 8 bits (as the default keeps them)
  hqq+down+v@fp32            the default with float compute (accuracy_level 1): how much of the loss is the
                             int8 activations of accuracy_level 4 rather than the 4-bit weights

    .venv/bin/python benchmarks/onnx_int4.py --model MERGED --eval-data DEV.jsonl --calibration TRAIN.jsonl \\
        [--rows 100] [--recipes hqq,k_quant,k_quant+down+v,hqq+down+v] [--out results/onnx_int4.json]

Writes the table to stdout, and JSON plus a PNG (size against mean KL) to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPES = {  # name -> (algorithm, MatMuls at 8 bits, accuracy_level)
    "hqq": ("hqq", (), 4), "rtn": ("rtn", (), 4), "k_quant": ("k_quant", (), 4),
    "k_quant+down": ("k_quant", ("down_proj",), 4), "k_quant+down+v": ("k_quant", ("down_proj", "v_proj"), 4),
    "hqq+down+v": ("hqq", ("down_proj", "v_proj"), 4), "hqq+down+v@fp32": ("hqq", ("down_proj", "v_proj"), 1),
    "gptq": ("gptq", (), 4), "gptq+down+v": ("gptq", ("down_proj", "v_proj"), 4),
}
GPTQ_SEQUENCES, GPTQ_TOKENS = 6, 512  # calibration for gptq: the training rows joined, cut into 6 x 512 tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="merged model directory")
    ap.add_argument("--eval-data", type=Path, required=True)
    ap.add_argument("--calibration", type=Path, help="training rows (gptq only)")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--recipes", default="hqq,k_quant,k_quant+down+v,hqq+down+v")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "onnx_int4.json")
    a = ap.parse_args()
    recipes = a.recipes.split(",")
    unknown = [r for r in recipes if r not in RECIPES]
    needs_calibration = any(RECIPES[r][0] == "gptq" for r in recipes if r in RECIPES)
    if unknown or (needs_calibration and a.calibration is None):
        sys.exit(f"--recipes: unknown {unknown}, choose from {', '.join(RECIPES)}" if unknown
                 else "--recipes gptq needs --calibration")

    from export.evalrows import load_eval_rows, reference_answers
    from export.onnx.reference import load_torch
    from export.onnx.write import export_fp32
    from runtime.modelfiles import load_tokenizer

    tok = load_tokenizer(str(a.model))
    evals = load_eval_rows(a.eval_data, tok, max_rows=a.rows)
    results = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = load_torch(a.model)
        print(f"reference: merged model in fp32 on {len(evals.rows)} rows; fp32 ONNX export ...", file=sys.stderr)
        ref = reference_answers(model, tok, evals)
        export_fp32(model, a.model, work / "fp32")
        del model
        gc.collect()
        for name in recipes:
            print(f"{name} ...", file=sys.stderr, flush=True)
            path, seconds = build(name, work, tok, a.calibration)
            results.append({"recipe": name, "build_s": round(seconds, 1), **evaluate(path, ref, tok)})
            path.unlink()
    report = {"model": str(a.model), "eval_data": str(a.eval_data), "rows": len(evals.rows),
              "reference_task_accuracy": results[0]["reference_task_accuracy"] if results else None, "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, a.out.with_suffix(".png"), a.model.name)
    print(f"Reference: merged model in fp32, task accuracy {report['reference_task_accuracy']:.3f} on {len(evals.rows)} rows.\n")
    print("| recipe | size MiB | top-1 | mean KL | task acc | answers = reference | build s |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['recipe']} | {r['size_mib']:.1f} | {r['top1_agreement']:.3f} | {r['mean_kl']:.3f} | "
              f"{r['task_accuracy']:.3f} | {r['answer_agreement']:.2f} | {r['build_s']:.0f} |")
    print(f"\nwrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


def build(name: str, work: Path, tok, calibration: Path | None) -> tuple[Path, float]:
    """Write recipe ``name`` from the fp32 graph; (path, seconds)."""
    from export.onnx.quantize import Int4Settings, quantize_int4

    algorithm, kept, level = RECIPES[name]
    out, start = work / f"{name.replace('+', '-').replace('@', '-')}.onnx", time.perf_counter()
    if algorithm == "gptq":
        gptq(work / "fp32" / "model.onnx", out, tok, calibration, kept)
    else:
        quantize_int4(work / "fp32" / "model.onnx", out,
                      Int4Settings(algorithm=algorithm, higher_precision=kept, accuracy_level=level))
    return out, time.perf_counter() - start


def gptq(src: Path, dest: Path, tok, calibration: Path, kept: tuple[str, ...] = ()) -> None:
    """onnxruntime's GPTQ (4-bit, blocks of 32, asymmetric) with the same logits projection and embedding;
    the MatMuls named by ``kept`` at 8 bits."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from export.calibration import load_calibration
    from export.onnx.graph import embedding_to_fp16, untie_lm_head
    from export.onnx.quantize import run_quantizer
    from export.onnx.write import save_onnx

    model = onnx.load(str(src))
    lm_head = untie_lm_head(model)
    past = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
            if i.name.startswith("past_key_values")}
    flat = [t for ids in load_calibration(calibration, tok).sequences for t in ids]
    feeds = []
    for i in range(GPTQ_SEQUENCES):
        ids = np.array([flat[i * GPTQ_TOKENS:(i + 1) * GPTQ_TOKENS]], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None],
                      **{n: np.zeros((1, shape[1], 0, shape[3]), np.float32) for n, shape in past.items()}})
    config = GPTQWeightOnlyQuantConfig(calibration_data_reader=feeds, op_types_to_quantize=("MatMul",))
    eight = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(k in n.name for k in kept)]
    model = run_quantizer(MatMulNBitsQuantizer(model, bits=4, block_size=32, accuracy_level=4,
                                               nodes_to_exclude=[lm_head] + eight, algo_config=config))
    model = run_quantizer(MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4,
                                               op_types_to_quantize=("MatMul",)))
    embedding_to_fp16(model)
    save_onnx(model, dest)


def evaluate(path: Path, ref, tok) -> dict:
    from export.evalrows import compare_on_rows
    from export.onnx.verify import OrtLM

    lm = OrtLM(path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    r = compare_on_rows(ref, tok, lambda ids: lm.logits([ids], pad)[0], lambda ids: int(lm.logits([ids], pad)[0][-1].argmax()))
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + "_data"))
    return {"size_mib": size / 2**20, "top1_agreement": r["top1_agreement"], "mean_kl": r["mean_kl"],
            "task_accuracy": r["task_accuracy"], "reference_task_accuracy": r["reference_task_accuracy"],
            "answer_agreement": r["answer_agreement"], "positions": r["positions"]}


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter([r["size_mib"]], [r["mean_kl"]])
        ax.annotate(r["recipe"], (r["size_mib"], r["mean_kl"]), fontsize=8)
    ax.set(xlabel="model.onnx size (MiB)", ylabel="mean KL vs merged fp32 (nats)", yscale="log",
           title=f"ONNX int4 recipes, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
