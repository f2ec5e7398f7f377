"""Two more transforms before llama.cpp quantization, measured against the default export in one run.

The issue behind the quantized artifacts asks to measure each outlier transform and keep only what
helps. The per-channel smoothing of ``export/smoothing.py`` is in the product; this benchmark measures
two further candidates on the same merged model, against the same defaults:

  rotation  an orthogonal rotation of the residual stream: every RMSNorm weight folded into the
            linear layers that read it, the embedding, q/k/v/gate/up input columns and the output
            projection rotated by R, o_proj/down_proj output rows by R^T (QuaRot's offline part; R is
            a random-sign Hadamard matrix where one exists for the hidden size, else a seeded random
            orthogonal one). The output projection can no longer share the embedding's bytes: a tied
            model is untied. The rotated fp32 model is checked against the original before use.
  gptq      the product's GPTQ onto q8_0's own grid (``export/gguf/gptq.py``, ``--gptq``): the weights'
            share of q8_0's loss compensated on the calibration rows, stored by llama.cpp byte for byte
            (the record's ``tensors_not_reproduced`` says so). Plain ``q8_0`` here is ``--no-gptq``.

Each variant is exported with ``export.gguf.export_gguf`` (the product path; smoothing and importance
matrix as the type's table row says) and then verified against the *original* merged model on the
evaluation rows, so every row of the table is judged by the same reference:

    .venv/bin/python benchmarks/exact_transforms.py [--rows 100] [--variants q8_0,q8_0+gptq,...]

Defaults read the model and data that ``benchmarks/quant_fidelity.py --prepare-only`` leaves in its
output directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QF = ROOT / "benchmarks" / "results" / "quant_fidelity"
VARIANTS = ("q8_0", "q8_0+rotation", "q8_0+gptq", "q8_0+rotation+gptq", "q4_k_m", "q4_k_m+rotation")
LOSSLESS_TOL = 1e-3  # largest |logit difference| of the rotated fp32 model, relative to the largest logit


def hadamard(n: int) -> Any:
    """A Hadamard matrix of order n built from Sylvester (2^k) and Paley (12) factors, or None."""
    import torch

    def paley12() -> Any:
        q = 11
        residues = {(i * i) % q for i in range(1, q)}
        chi = [[0 if (j - i) % q == 0 else (1 if (j - i) % q in residues else -1) for j in range(q)] for i in range(q)]
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, torch.tensor(chi, dtype=torch.float64)
        return s + torch.eye(q + 1, dtype=torch.float64)

    h = torch.ones(1, 1, dtype=torch.float64)
    while n % 12 == 0 and n > 1:
        h, n = torch.kron(h, paley12()), n // 12
    while n % 2 == 0 and n > 1:
        h, n = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)), n // 2
    return h if n == 1 else None


def rotation_matrix(d: int, seed: int = 0) -> tuple[Any, str]:
    """An orthogonal (d, d) float64 matrix: random-sign Hadamard when one exists, else random orthogonal."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h = hadamard(d)
    if h is not None:
        signs = torch.randint(0, 2, (d,), generator=g).double() * 2 - 1
        return signs[:, None] * h / d ** 0.5, "random-sign Hadamard"
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], "random orthogonal"


def rotate(model: Any) -> str:
    """Fold the norms and rotate the residual stream of a Llama-style model in place; returns R's kind."""
    import torch

    if model.config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
        raise SystemExit(f"rotation: no rule for model type {model.config.model_type!r} (sandwich norms, "
                         "norm offsets or embedding scales need their own)")
    r, kind = rotation_matrix(model.config.hidden_size)
    base = model.model
    with torch.no_grad():
        emb = base.embed_tokens.weight.double()
        head = emb.clone() if model.config.tie_word_embeddings else model.lm_head.weight.double()
        head = head * base.norm.weight.double()[None, :] @ r
        base.norm.weight.fill_(1.0)
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                for lin in readers:  # (out, d) @ diag(norm) @ R
                    lin.weight.copy_((lin.weight.double() * norm.weight.double()[None, :] @ r).float())
                norm.weight.fill_(1.0)
            for lin in (attn.o_proj, mlp.down_proj):  # R^T @ (d, in)
                lin.weight.copy_((r.T @ lin.weight.double()).float())
        model.config.tie_word_embeddings = False
        base.embed_tokens.weight = torch.nn.Parameter((emb @ r).float())
        model.lm_head.weight = torch.nn.Parameter(head.float())
    return kind


def same_function(original_dir: Path, transformed: Any, sequences: list[list[int]]) -> float:
    """Largest |logit difference| between the original and the transformed fp32 model, relative."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(original_dir), dtype=torch.float32).eval()
    worst = 0.0
    with torch.inference_mode():
        for ids in sequences[:4]:
            a = ref(input_ids=torch.tensor([ids])).logits
            b = transformed(input_ids=torch.tensor([ids])).logits
            worst = max(worst, float((a - b).abs().max() / a.abs().max()))
    return worst


def rotated(model_dir: Path, calibration: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """A rotated copy of ``model_dir`` in ``work``, checked to compute what the original does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.calibration import load_calibration

    calib = load_calibration(calibration, AutoTokenizer.from_pretrained(str(model_dir)))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    info: dict[str, Any] = {"rotation": rotate(model)}
    info["rotated_max_rel_logit_diff"] = same_function(model_dir, model, calib.sequences)
    if info["rotated_max_rel_logit_diff"] > LOSSLESS_TOL:
        raise SystemExit(f"the rotated fp32 model is not the original ({info['rotated_max_rel_logit_diff']:.2e})")
    dest = work / "rotated"
    shutil.rmtree(dest, ignore_errors=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    for p in model_dir.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != "config.json":
            shutil.copy2(p, dest / p.name)
    return dest, info


def measure(variant: str, model_dir: Path, calibration: Path, eval_data: Path, rows: int, out: Path) -> dict[str, Any]:
    from export.evalrows import load_eval_rows
    from export.gguf import export_gguf
    from export.gguf.tables import QUANT_TYPES, QuantOptions
    from export.gguf.verify import verify_gguf
    from runtime.modelfiles import load_tokenizer

    t0 = time.perf_counter()
    qtype, *steps = variant.split("+")
    source, info = rotated(model_dir, calibration, out / "work") if "rotation" in steps else (model_dir, {})
    path = out / f"{variant.replace('+', '-')}.gguf"
    # everything else as the type's table row says (smoothing, importance matrix)
    options = QuantOptions(gptq=True) if "gptq" in steps else QuantOptions(gptq=False)
    rec = export_gguf(source, path, qtype=qtype, calibration=calibration, quant_options=options, overwrite=True)
    gptq = rec.metrics["quantization"].get("gptq")
    if gptq:
        info["gptq_output_error_vs_rtn_median"] = gptq["output_error_vs_round_to_nearest"]["median"]
        info["q8_0_tensors_not_reproduced"] = len(gptq["tensors_not_reproduced"])
    tok = load_tokenizer(str(model_dir))
    _, metrics = verify_gguf(path, model_dir, QUANT_TYPES[qtype], tok, load_eval_rows(eval_data, tok, max_rows=rows))
    e = metrics["eval_rows"]
    return {"variant": variant, "size_mib": round(path.stat().st_size / 2**20, 1), "rows": e["rows"],
            "positions": e["positions"], "top1": round(e["top1_agreement"], 4), "mean_kl": round(e["mean_kl"], 5),
            "answer_agreement": e["answer_agreement"], "task_accuracy": e["task_accuracy"],
            "reference_task_accuracy": e["reference_task_accuracy"], "seconds": round(time.perf_counter() - t0), **info}


def table(results: list[dict[str, Any]]) -> str:
    base = {r["variant"].split("+")[0]: r for r in results if "+" not in r["variant"]}
    lines = ["| variant | MiB | top-1 | mean KL | KL / default | answers = ref | task acc (ref) | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = base.get(r["variant"].split("+")[0])
        ratio = f"{r['mean_kl'] / b['mean_kl']:.2f}" if b and b["mean_kl"] else "-"
        notes = ", ".join(f"{k} {v}" for k, v in r.items() if k in ("rotation", "gptq_output_error_vs_rtn_median", "rotated_max_rel_logit_diff",
                                                                     "q8_0_tensors_not_reproduced"))
        lines.append(f"| {r['variant']} | {r['size_mib']} | {r['top1']:.4f} | {r['mean_kl']:.5f} | {ratio} | "
                     f"{r['answer_agreement']:.3f} | {r['task_accuracy']:.3f} ({r['reference_task_accuracy']:.3f}) | {notes} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=QF / "merged", help="merged model directory (fp32 or 16-bit)")
    ap.add_argument("--calibration", type=Path, default=QF / "data" / "train.jsonl")
    ap.add_argument("--eval-data", type=Path, default=QF / "data" / "dev-verify.jsonl")
    ap.add_argument("--rows", type=int, default=100, help="evaluation rows every variant is judged on")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "exact_transforms")
    a = ap.parse_args()
    for p in (a.model, a.calibration, a.eval_data):
        if not p.exists():
            raise SystemExit(f"{p}: not found (run benchmarks/quant_fidelity.py --prepare-only first, or pass it)")
    a.output.mkdir(parents=True, exist_ok=True)
    results = []
    for v in [v.strip() for v in a.variants.split(",") if v.strip()]:
        print(f"== {v}", flush=True)
        results.append(measure(v, a.model, a.calibration, a.eval_data, a.rows, a.output))
        print(json.dumps(results[-1]), flush=True)
        (a.output / "results.json").write_text(json.dumps(results, indent=1))
    shutil.rmtree(a.output / "work", ignore_errors=True)
    md = table(results)
    (a.output / "results.md").write_text(f"Reference: {a.model}, {a.rows} rows of {a.eval_data}\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
