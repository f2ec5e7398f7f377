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
from typing import Any, Callable

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
            result["accuracy"] = score(backend, spec["accuracy"], _progress_writer(spec.get("progress_file")))
        result["peak_rss_total_bytes"] = peak_rss_bytes()
    finally:
        backend.close()
    result["torch_imported"] = "torch" in sys.modules and sys.modules["torch"] is not None
    return result


def score(backend: Any, acc: dict[str, Any], progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Teacher-forced agreement with the reference, answer perplexity, and greedy answers.

    The reference writes a top-K summary of each compared position; an artifact compares its own
    logits with it row by row: memory holds one row's logits, whatever the number of rows.
    """
    from edgeft.core.compare import compare_to_summary, token_nll, top_k_summary
    from runtime.backends import greedy

    rows = acc["rows"]
    counts = [len(r["ids"]) - 1 - r["compare_from"] for r in rows]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    ids_file, lp_file = _summary_files(acc["logits_file"])
    writing = acc["write_logits"]
    ref_ids = ref_lp = None
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
        if ref_ids is None:
            ref_ids, ref_lp = _open_summary(ids_file, lp_file, int(offsets[-1]), mine.shape[1], writing)
        sl = slice(offsets[i], offsets[i + 1])
        if writing:
            ref_ids[sl], ref_lp[sl] = top_k_summary(mine)
        else:
            m = compare_to_summary(np.asarray(ref_ids[sl]), np.asarray(ref_lp[sl]), mine)
            top1 += m["top1_agreement"] * counts[i]
            kl_sum += m["mean_kl"] * counts[i]
            kl_max, max_diff = max(kl_max, m["max_kl"]), max(max_diff, m["max_abs_logprob_diff"])
        del logits, mine
        generations.append(greedy(backend, ids[:p], acc["answer_tokens"], acc["stop_ids"]))
        if progress is not None:
            progress(i + 1, len(rows))
    if writing and ref_ids is not None:
        ref_ids.flush()
        ref_lp.flush()
    n = int(offsets[-1])
    out: dict[str, Any] = {
        "positions": n,
        "answer_tokens": nll_count,
        "perplexity": math.exp(nll_sum / nll_count) if nll_count else float("nan"),
        "generations": generations,
    }
    if not writing:
        out.update(top1_agreement=top1 / n if n else float("nan"), mean_kl=kl_sum / n if n else float("nan"),
                   max_kl=kl_max, max_abs_diff=max_diff)
    else:
        out.update(top1_agreement=1.0, mean_kl=0.0, max_kl=0.0, max_abs_diff=0.0)
    return out


def _progress_writer(path: str | None) -> Callable[[int, int], None] | None:
    """Rows scored so far, written as "DONE TOTAL" to ``path`` for the bench's progress bar."""
    if not path:
        return None

    def write(done: int, total: int) -> None:
        tmp = Path(path + ".tmp")
        tmp.write_text(f"{done} {total}")
        tmp.replace(path)
    return write


def _summary_files(prefix: str) -> tuple[Path, Path]:
    return Path(prefix + ".ids.npy"), Path(prefix + ".logprobs.npy")


def _open_summary(ids_file: Path, lp_file: Path, n: int, vocab: int, writing: bool) -> tuple[np.ndarray, np.ndarray]:
    """The reference's top-K ids and log-probs, memory-mapped: created by the reference, read by the others."""
    from edgeft.core.compare import TOP_K

    if writing:
        k = min(TOP_K, vocab)
        return (np.lib.format.open_memmap(ids_file, mode="w+", dtype=np.int32, shape=(n, k)),
                np.lib.format.open_memmap(lp_file, mode="w+", dtype=np.float32, shape=(n, k)))
    return np.load(ids_file, mmap_mode="r"), np.load(lp_file, mmap_mode="r")


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
