"""Benchmark one artifact in its own process: ``python -m runtime.worker SPEC.json RESULT.json``.

A process per artifact keeps peak RSS per artifact and keeps torch out of the ONNX and
llama.cpp runs (this module imports numpy, edgeft.core.errors and the chosen back-end only).

The spec (written by ``runtime.bench``)::

    {"name", "kind", "path", "threads", "max_tokens",
     "latency":  {"prompt": [ids], "new_tokens", "warmup", "repeats"} | null,
     "accuracy": {"rows": [{"ids": [ids], "prompt_len": P, "compare_from": C}],
                  "answer_tokens", "stop_ids": [ids],
                  "logits_file": PATH.npy, "write_logits": bool} | null}

Row ``ids`` are prompt + reference answer (+ end of turn). Logits at positions C .. T-2 are
compared with the reference's (the reference worker writes them to ``logits_file``, a float32
(N, V) .npy that later workers read as a memmap, one row slice at a time); positions P-1 .. T-2
score the answer tokens for perplexity. The result is JSON (see ``run``); a user error is
``{"error": "..."}`` with exit status 2.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.core.errors import EdgeftError


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set, in bytes.

    Linux: ``VmHWM`` of /proc/self/status. ``ru_maxrss`` is no good there: the kernel carries
    the parent's high-water mark through fork and exec, so every worker would report the
    bench process's peak. Elsewhere ``ru_maxrss`` (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, time, then score one artifact as ``spec`` says; returns the figures."""
    from runtime.backends import import_engine, open_backend
    from runtime.latency import measure

    result: dict[str, Any] = {"name": spec["name"], "kind": spec["kind"], "path": spec["path"],
                              "threads": spec["threads"]}
    t0 = time.perf_counter()
    import_engine(spec["kind"])  # library import time is reported apart from model load time
    result["import_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    backend = open_backend(spec["kind"], spec["path"], threads=spec["threads"], max_tokens=spec["max_tokens"])
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load_bytes"] = peak_rss_bytes()
    try:
        result["weights"] = backend.weight_bytes().to_dict()
        result["n_vocab"] = backend.n_vocab
        if spec.get("latency"):
            lat = spec["latency"]
            result["latency"] = measure(backend, lat["prompt"], new_tokens=lat["new_tokens"], warmup=lat["warmup"],
                                        repeats=lat["repeats"])
        # Peak of load + the latency workload: what the device must hold to serve it.
        result["peak_rss_bytes"] = peak_rss_bytes()
        if spec.get("accuracy"):
            result["accuracy"] = score(backend, spec["accuracy"])
        result["peak_rss_total_bytes"] = peak_rss_bytes()
    finally:
        backend.close()
    result["torch_imported"] = "torch" in sys.modules and sys.modules["torch"] is not None
    return result


def score(backend: Any, acc: dict[str, Any]) -> dict[str, Any]:
    """Teacher-forced agreement with the reference, answer perplexity, and greedy answers."""
    from runtime.backends import greedy
    from edgeft.core.compare import compare_logits, token_nll

    rows = acc["rows"]
    counts = [len(r["ids"]) - 1 - r["compare_from"] for r in rows]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    path = Path(acc["logits_file"])
    ref = None
    top1 = kl_sum = 0.0
    kl_max = max_diff = 0.0
    nll_sum, nll_count = 0.0, 0
    generations: list[list[int]] = []
    for i, row in enumerate(rows):
        ids, p, c = row["ids"], row["prompt_len"], row["compare_from"]
        logits = backend.logits(ids)  # (T, V)
        nll = token_nll(logits[p - 1: len(ids) - 1], np.asarray(ids[p:]))
        nll_sum, nll_count = nll_sum + float(nll.sum()), nll_count + len(nll)
        mine = logits[c: len(ids) - 1]  # (counts[i], V)
        if acc["write_logits"]:
            if ref is None:
                ref = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), logits.shape[1]))
            ref[offsets[i]: offsets[i + 1]] = mine
        else:
            if ref is None:
                ref = np.load(path, mmap_mode="r")
            m = compare_logits(np.asarray(ref[offsets[i]: offsets[i + 1]]), mine)
            top1 += m["top1_agreement"] * counts[i]
            kl_sum += m["mean_kl"] * counts[i]
            kl_max, max_diff = max(kl_max, m["max_kl"]), max(max_diff, m["max_abs_diff"])
        generations.append(greedy(backend, ids[:p], acc["answer_tokens"], acc["stop_ids"]))
    if acc["write_logits"] and ref is not None:
        ref.flush()
    n = int(offsets[-1])
    out: dict[str, Any] = {
        "positions": n,
        "answer_tokens": nll_count,
        "perplexity": math.exp(nll_sum / nll_count) if nll_count else float("nan"),
        "generations": generations,
    }
    if not acc["write_logits"]:
        out.update(top1_agreement=top1 / n if n else float("nan"), mean_kl=kl_sum / n if n else float("nan"),
                   max_kl=kl_max, max_abs_diff=max_diff)
    else:
        out.update(top1_agreement=1.0, mean_kl=0.0, max_kl=0.0, max_abs_diff=0.0)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m runtime.worker SPEC.json RESULT.json", file=sys.stderr)
        return 64
    spec_path, out_path = map(Path, args)
    from edgeft.core.fsutil import write_json

    try:
        result, code = run(json.loads(spec_path.read_text())), 0
    except EdgeftError as e:
        result, code = {"error": e.format_message()}, 2
    except MemoryError:
        result, code = {"error": "out of memory"}, 3
    except Exception as e:  # report it as one line; the traceback goes to stderr for the log
        traceback.print_exc()
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        result, code = {"error": f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]}, 1
    write_json(out_path, result)
    return code


if __name__ == "__main__":
    sys.exit(main())
