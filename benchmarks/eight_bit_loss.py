"""Where an 8-bit artifact's disagreement with its model comes from, and what agreement would cost.

GGUF q8_0 and ONNX int8 store weights as symmetric 8-bit blocks of 32, and their CPU kernels quantize the
activations too: llama.cpp's q8_0 dot product rounds each input row onto the same grid (blocks of 32 along
the input, scale = max|x| / 127), as onnxruntime's int8 compute (MatMulNBits accuracy_level 4) does. This
benchmark simulates both roundings in PyTorch, on the merged model, and compares each simulation with the
unquantized model over the evaluation rows the way ``edgeft bench`` does (each distinct context once;
top-1 agreement and mean KL against the reference's top-K summary):

- weights only, activations only, both (the product's q8_0: the projections its ``keep`` stores in f16
  stay float, weights and activations);
- both, with one projection kind left float (what storing that kind in f16 buys, and its MiB);
- both, with kinds left float cumulatively, best gain per MiB first, until top-1 reaches ``--target``.

    .venv/bin/python benchmarks/eight_bit_loss.py [--model MERGED] [--eval-data DEV.jsonl] [--rows 256]
        [--target 0.97] [--out results/eight_bit_loss.json]

Defaults read what ``benchmarks/quant_fidelity.py --prepare-only`` leaves in its output directory. Writes
the table to stdout, and JSON plus a PNG (MiB against top-1) to --out. The simulation leaves out llama.cpp's
other roundings (f16 KV cache and f16 tensors; an f16 GGUF of the same model agrees almost exactly); compare its
"weights + activations" row with ``edgeft export gguf --type q8_0 --no-smooth --eval-data`` on the same rows.
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
BLOCK = 32  # q8_0's block, and the product's ONNX int8 block (export/onnx/quantize.py Int8Settings)
Q8_BITS_PER_WEIGHT = 8.5  # 32 int8 values + one fp16 scale
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# GGUF tensor name (export/gguf/tables.py keep patterns) -> the projection kind it holds
GGUF_KIND = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
             "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj", "output": "lm_head"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=QF / "merged", help="merged model directory")
    ap.add_argument("--eval-data", type=Path, default=QF / "data" / "dev-verify.jsonl")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--target", type=float, default=0.97, help="top-1 agreement the cumulative search stops at")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eight_bit_loss.json")
    a = ap.parse_args()

    sim = Simulation(a.model, a.eval_data, a.rows)
    kept = product_float_kinds()
    kinds = [k for k in KINDS if k in sim.kinds and k not in kept]
    print(f"{a.model}: {len(sim.rows)} rows, {sim.positions} distinct contexts; "
          f"float in the product's q8_0: {', '.join(kept) or 'nothing'}", flush=True)
    results = [sim.run("weights only", weights=kinds, activations=()),
               sim.run("activations only", weights=(), activations=kinds),
               sim.run("weights + activations (q8_0)", weights=kinds, activations=kinds)]
    base = results[-1]
    single = []
    for k in kinds:
        rest = [x for x in kinds if x != k]
        single.append(sim.run(f"... {k} float", weights=rest, activations=rest, extra_mib=sim.f16_cost([k]), kind=k))
    results += single
    order = sorted(single, key=lambda r: -(r["top1_agreement"] - base["top1_agreement"]) / max(r["extra_mib"], 1e-9))
    floated, current = [order[0]["kind"]], order[0]  # the best single kind's row is above
    for r in order[1:]:
        if current["top1_agreement"] >= a.target:
            break
        floated.append(r["kind"])
        rest = [x for x in kinds if x not in floated]
        current = sim.run(f"... {' + '.join(floated)} float", weights=rest, activations=rest,
                          extra_mib=sim.f16_cost(floated))
        results.append(current)

    print(f"\n{a.model} ({len(sim.rows)} evaluation rows, {sim.positions} distinct contexts; 8-bit blocks of {BLOCK}; "
          f"q8_0 file {sim.q8_mib:.1f} MiB by this count)\n")
    print("| simulated | + MiB in f16 | top-1 | mean KL |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['extra_mib']:.1f} | {r['top1_agreement']:.4f} | {r['mean_kl']:.5f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"model": str(a.model), "eval_data": str(a.eval_data), "rows": len(sim.rows),
                               "positions": sim.positions, "q8_0_mib": round(sim.q8_mib, 1),
                               "float_in_product": kept, "target": a.target, "results": results}, indent=2))
    tmp.replace(a.out)
    _plot(results, a.out.with_suffix(".png"), a.model.name, a.target, sim.q8_mib)
    print(f"\nwrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


def product_float_kinds() -> list[str]:
    """The projection kinds the product's q8_0 stores in f16 (``QUANT_TYPES['q8_0'].keep``)."""
    from export.gguf.tables import QUANT_TYPES, F16

    kinds = []
    for pattern, ggml_type in QUANT_TYPES["q8_0"].keep:
        if ggml_type == F16:
            kinds += [kind for name, kind in GGUF_KIND.items() if pattern.startswith(name + r"\.")]
    return kinds


def q8_round(x, block: int = BLOCK):
    """``x`` rounded onto symmetric 8-bit blocks along its last dimension (scale max|x|/127, stored fp16)."""
    import torch

    shape = x.shape
    xb = x.reshape(*shape[:-1], shape[-1] // block, block)
    scale = (xb.abs().amax(-1, keepdim=True) / 127).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(xb / safe) * scale).reshape(shape)


class Simulation:
    """The fp32 model, its reference summaries over the evaluation rows, and simulated 8-bit runs."""

    def __init__(self, model_dir: Path, eval_data: Path, rows: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from export.evalrows import reference_summaries
        from runtime.bench.evalset import eval_set

        tok = AutoTokenizer.from_pretrained(model_dir)
        self.rows = eval_set(tok, eval_data, rows, 4, model_dir).rows
        self.positions = sum(len(r.ids) - 1 - r.compare_from for r in self.rows)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.linears = {n: m for n, m in self.model.named_modules()
                        if isinstance(m, torch.nn.Linear) and m.in_features % BLOCK == 0}
        self.kind_of = {n: n.rsplit(".", 1)[-1] for n in self.linears}  # module -> projection kind
        self.kinds = set(self.kind_of.values())
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.param_of = {n: names[id(m.weight)] for n, m in self.linears.items()}  # module -> its weight's name
        self.weights = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.dim() == 2}
        self.embedding = names[id(self.model.get_input_embeddings().weight)]
        # tied: the output projection is the embedding, stored (and rounded) as the lm_head kind says
        self.tied = self.embedding in self.param_of.values()
        self.reference = reference_summaries(self.rows, self._logits)
        total = sum(p.numel() for p in self.weights.values())
        self.q8_mib = total * Q8_BITS_PER_WEIGHT / 8 / 2**20

    def f16_cost(self, kinds) -> float:
        """MiB more for storing ``kinds`` in f16 instead of q8_0 (a tied output projection is the embedding)."""
        names = {self.param_of[n] for n, kind in self.kind_of.items() if kind in kinds}
        return sum(self.weights[n].numel() for n in names) * (16 - Q8_BITS_PER_WEIGHT) / 8 / 2**20

    def run(self, name: str, *, weights, activations, extra_mib: float = 0.0, kind: str | None = None) -> dict:
        """Top-1 / mean KL with the weights of ``weights`` kinds and the inputs of ``activations`` kinds rounded."""
        import torch

        from export.evalrows import agreement_on_rows

        start = time.perf_counter()
        rounded = {self.param_of[n] for n, kind in self.kind_of.items() if kind in weights}
        if weights and not self.tied:  # llama.cpp stores the token embedding at q8_0 in a q8_0 file
            rounded.add(self.embedding)
        params = dict(self.model.named_parameters())
        hooks = [m.register_forward_pre_hook(lambda _m, args: (q8_round(args[0]),) + tuple(args[1:]))
                 for n, m in self.linears.items() if self.kind_of[n] in activations]
        try:
            with torch.no_grad():
                for n, w in self.weights.items():
                    params[n].copy_(q8_round(w) if n in rounded else w)
            m = agreement_on_rows(self.rows, self.reference, self._logits)
        finally:
            for h in hooks:
                h.remove()
        result = {"name": name, "kind": kind, "extra_mib": round(extra_mib, 1), "top1_agreement": round(m["top1_agreement"], 4),
                  "mean_kl": round(m["mean_kl"], 6), "seconds": round(time.perf_counter() - start, 1)}
        print(f"{name}: top-1 {result['top1_agreement']:.4f}, KL {result['mean_kl']:.5f}, +{extra_mib:.1f} MiB", flush=True)
        return result

    def _logits(self, row):
        from export.evalrows import torch_compared_logits

        return torch_compared_logits(self.model, row)


def _plot(results, path: Path, title: str, target: float, q8_mib: float) -> None:
    from edgeft.plots import _pyplot, save_png

    fig, ax = _pyplot().subplots(figsize=(7.5, 4.5))
    for r in results:
        if r["name"] in ("weights only", "activations only"):
            ax.axhline(r["top1_agreement"], color="C2" if r["name"] == "weights only" else "C1", ls=":", lw=1)
            ax.annotate(r["name"], (q8_mib, r["top1_agreement"]), fontsize=7)
            continue
        ax.scatter(q8_mib + r["extra_mib"], r["top1_agreement"], color="C3" if r["kind"] is None else "C0")
        ax.annotate(r["name"].replace("... ", "").replace(" float", ""), (q8_mib + r["extra_mib"], r["top1_agreement"]),
                    fontsize=7)
    ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set_xlabel("weights, MiB (q8_0, the named projections in f16)")
    ax.set_ylabel("top-1 agreement (simulated)")
    ax.set_title(f"8-bit weights and activations: what stays float ({title})")
    save_png(fig, path)


if __name__ == "__main__":
    sys.exit(main())
