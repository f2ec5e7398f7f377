"""Latency and accuracy of every exported artifact against the unmerged PyTorch model (``edgeft bench``).

Stages of ``run_bench`` (one function each):

1. ``check_inputs``: kind of every path, verification records, and (``check_tokenizers``) that
   every artifact's tokenizer encodes sample texts exactly as the reference's does. Every
   problem is reported at once, before any model is loaded.
2. ``eval_set``: the evaluation rows tokenised once, by the reference tokenizer, through its
   chat template: prompt ids, reference answer ids (+ end of turn), and the first compared
   position (the start of the last user turn: a system prompt shared by every row would
   otherwise dominate the comparison and the reference-logits file).
3. ``measure_bandwidth`` (runtime.machine): the memory-bandwidth ceiling, once.
4. One worker process per model (``runtime.worker``), the reference first: load, latency
   (warm-up + repeats), then teacher-forced logits and greedy answers. The reference's
   compared logits go to a float32 .npy that later workers memory-map.
5. ``assemble``: per-artifact figures, ratios to the reference, bandwidth fraction, flags.
6. ``runtime.report``: report.json, report.md, PNG plots, the printed table.

Token ids are produced once, by the reference tokenizer, and fed to every back-end, so every
artifact sees exactly the same inputs and decodes with the same greedy loop.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.errors import ConfigError, DataError, EdgeftError
from runtime import latency as L
from runtime.artifacts import GGUF, MERGED, UNMERGED, Artifact, base_model_of, describe
from runtime.thresholds import ACCURACY_DROP_MAX, TOP1_MIN, flags_for, precision_class, top1_bar

ANSWER_TOKENS = 16  # greedy answer length for task accuracy (stops earlier at end of turn)
MAX_ROWS = 64
REF_LOGITS_MAX_BYTES = 2 * 2**30  # reference logits file: rows x compared positions x vocab x 4 bytes
MAX_COMPARED_PER_ROW = 512  # a longer row is compared on its last positions only
WORK_DIR = ".work"  # inside --output; worker specs, results and the reference logits; removed at the end
STRICT_EXIT_CODE = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # any one makes a HF tokenizer directory

# Texts both tokenizers must encode identically (plain prose, code, numbers, accents, chat markup).
TOKENIZER_SAMPLES = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Prices rose 3.5% in 2024, said 12 café owners.",
)
TOKENIZER_CHAT_SAMPLE = [{"role": "user", "content": "Is this review positive or negative? Great value."},
                         {"role": "assistant", "content": "positive"}]
# Latency prompt: this text through the chat template, repeated as needed and cut to --prompt-tokens.
LATENCY_TEXT = (
    "Summarise the following notes for a colleague who missed the meeting. The team reviewed the quarterly "
    "plan, agreed to move the product launch by two weeks to finish accessibility testing, asked finance for "
    "a revised budget, and assigned owners for the documentation, the migration guide and the support rota."
)


class ThresholdsNotMet(EdgeftError):
    """``--strict``: at least one artifact fell below its accuracy bars."""

    exit_code = STRICT_EXIT_CODE


@dataclass
class BenchConfig:
    """Everything ``edgeft bench`` needs; ``validate`` checks it before any file is read."""

    reference: Path  # adapter directory (unmerged) or merged model directory
    artifacts: list[Path]  # merged directories, ONNX export directories, .gguf files
    data: Path  # evaluation file (instruction / chat / prompt-completion rows)
    output: Path  # directory for report.json, report.md and the plots
    threads: int | None = None  # intra-op threads for every engine (default: physical cores)
    max_rows: int | None = MAX_ROWS  # first N evaluation rows (None: all)
    prompt_tokens: int = L.PROMPT_TOKENS  # latency workload prompt length
    new_tokens: int = L.NEW_TOKENS  # latency workload generated tokens (EOS ignored)
    warmup: int = L.WARMUP  # discarded runs before timing
    repeats: int = L.REPEATS  # timed runs; median and spread are reported
    answer_tokens: int = ANSWER_TOKENS  # greedy answer length for task accuracy
    allow_unverified: bool = False  # benchmark artifacts whose verification record is missing or failed
    top1_overrides: dict[str, float] = field(default_factory=dict)  # class ("all", "4-bit", ...) -> top-1 bar
    max_accuracy_drop: float = ACCURACY_DROP_MAX  # task accuracy may fall this far below the reference's
    strict: bool = False  # raise ThresholdsNotMet (exit 4) when an artifact is flagged
    overwrite: bool = False  # write into a non-empty --output
    keep_work: bool = False  # keep --output/.work (worker specs, results, reference logits)

    def validate(self) -> None:
        problems = []
        for name, value, low in (("--prompt-tokens", self.prompt_tokens, 1), ("--new-tokens", self.new_tokens, 2),
                                 ("--warmup", self.warmup, 0), ("--repeats", self.repeats, 1),
                                 ("--answer-tokens", self.answer_tokens, 1)):
            if value < low:
                problems.append(f"{name} {value}: must be at least {low}")
        if self.max_rows is not None and self.max_rows < 1:
            problems.append(f"--max-rows {self.max_rows}: must be at least 1")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads {self.threads}: must be at least 1")
        if not self.artifacts:
            problems.append("--artifact: give at least one artifact to compare with the reference")
        if problems:
            raise ConfigError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Entry point


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Benchmark ``cfg.artifacts`` against ``cfg.reference``; write and return the report."""
    from edgeft.fsutil import ensure_free_space, prepare_output_dir
    from edgeft.progress import say, step_progress
    from runtime import report as R
    from runtime.machine import machine_info, measure_bandwidth, physical_cores, versions

    cfg.validate()
    reference, artifacts, records = check_inputs(cfg)
    tok = reference_tokenizer(reference)
    check_tokenizers(tok, reference, artifacts)
    evals = eval_set(tok, cfg.data, cfg.max_rows, cfg.answer_tokens, model_dir=_model_dir(reference))
    prompt = latency_prompt(tok, cfg.prompt_tokens)
    threads = cfg.threads or physical_cores()

    logits_bytes = evals.positions * len(tok) * 4
    if logits_bytes > REF_LOGITS_MAX_BYTES:
        raise ConfigError(f"--max-rows: {evals.positions} compared positions x {len(tok)} vocabulary need "
                          f"{logits_bytes / 2**30:.1f} GiB of reference logits (limit {REF_LOGITS_MAX_BYTES / 2**30:.0f}); "
                          "lower --max-rows")
    out = prepare_output_dir(cfg.output, overwrite=cfg.overwrite)
    ensure_free_space(out, logits_bytes + 64 * 2**20, "the reference logits")
    work = out / WORK_DIR
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    machine = machine_info()
    say(f"measuring memory bandwidth ({threads} threads)")
    machine["bandwidth"] = measure_bandwidth(threads)
    plan = WorkerPlan(work=work, threads=threads, prompt=prompt, cfg=cfg, evals=evals,
                      max_tokens=max(evals.max_tokens, len(prompt) + cfg.new_tokens))
    results = []
    try:
        with step_progress("bench", "current") as bar:
            task = bar.add_task("bench", total=1 + len(artifacts), current=reference.name)
            for i, art in enumerate([reference, *artifacts]):
                bar.update(task, current=f"{art.name} ({art.backend})")
                say(f"[{i + 1}/{1 + len(artifacts)}] {art.name}: {art.kind} {art.precision} on {art.backend}")
                res = run_worker(plan, art, reference=i == 0, index=i)
                results.append(res)
                say(_one_line_summary(art, res))
                bar.advance(task)
    finally:
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_average_after"] = machine_info()["load_average"]

    report = assemble(cfg, reference, artifacts, records, results, evals, tok, machine, versions(), threads, prompt)
    R.write_report(report, out)
    R.print_table(report)
    if cfg.strict and report["flagged"]:
        names = "; ".join(f"{e['name']} ({', '.join(e['flags'])})" for e in report["entries"] if e["flags"])
        raise ThresholdsNotMet(f"--strict: {len(report['flagged'])} artifact(s) below the accuracy bars: {names}")
    return report


# ---------------------------------------------------------------------------------------------
# 1. Inputs


def check_inputs(cfg: BenchConfig) -> tuple[Artifact, list[Artifact], dict[str, dict[str, Any] | None]]:
    """Describe the reference and artifacts and read their records; all problems in one error."""
    from edgeft.records import files_changed, read_record

    problems: list[str] = []
    reference = None
    try:
        reference = describe(cfg.reference, flag="--reference")
        if reference.kind not in (UNMERGED, MERGED):
            problems.append(f"--reference {cfg.reference}: a {reference.kind} artifact; the reference must be an "
                            "adapter directory (run unmerged) or a merged model directory")
    except EdgeftError as e:
        problems.append(e.format_message())
    artifacts: list[Artifact] = []
    records: dict[str, dict[str, Any] | None] = {}
    for path in cfg.artifacts:
        try:
            art = describe(path, flag="--artifact")
        except EdgeftError as e:
            problems.append(e.format_message())
            continue
        if art.kind == UNMERGED:
            problems.append(f"--artifact {path}: an adapter directory; merge it (edgeft merge) or pass it as --reference")
            continue
        record = None
        try:
            record = read_record(art.path)
        except EdgeftError:
            if not cfg.allow_unverified:
                problems.append(f"--artifact {path}: no verification record ({_record_name(art)} missing); "
                                "export it with edgeft, or pass --allow-unverified")
        if record is not None and record["status"] != "passed" and not cfg.allow_unverified:
            failed = [c.get("name", "?") for c in record.get("checks", []) if not c.get("passed", True)]
            problems.append(f"--artifact {path}: failed its verification ({', '.join(failed) or 'status failed'}); "
                            "pass --allow-unverified to benchmark it anyway")
        elif record is not None and not cfg.allow_unverified and (changed := files_changed(art.path, record)):
            problems.append(f"--artifact {path}: {changed}; its verification no longer holds: re-export it, "
                            "or pass --allow-unverified")
        records[str(art.path)] = record
        artifacts.append(art)
    if problems:
        raise EdgeftError("; ".join(problems))
    assert reference is not None
    reference, *artifacts = _unique_names([reference, *artifacts])
    return reference, artifacts, records


def _record_name(art: Artifact) -> str:
    from edgeft.records import record_path

    return record_path(art.path).name


def _unique_names(artifacts: list[Artifact]) -> list[Artifact]:
    """Labels must be unique in tables and plots: a repeated name gets its parent directory."""
    from dataclasses import replace

    seen: dict[str, int] = {}
    for a in artifacts:
        seen[a.name] = seen.get(a.name, 0) + 1
    return [replace(a, name=f"{a.path.parent.name}/{a.name}") if seen[a.name] > 1 else a for a in artifacts]


def _tokenizer_dir(art: Artifact) -> Path | None:
    """Where ``art``'s Hugging Face tokenizer lives (None: a GGUF, whose vocabulary is inside)."""
    if art.kind == GGUF:
        return None
    if _has_tokenizer(art.path):
        return art.path
    if art.kind == UNMERGED:
        return Path(base_model_of(art.path))
    return art.path


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def _model_dir(reference: Artifact) -> Path:
    """The directory with the reference's config and generation_config (the base, for an adapter)."""
    return Path(base_model_of(reference.path)) if reference.kind == UNMERGED else reference.path


def reference_tokenizer(reference: Artifact) -> Any:
    from edgeft.models import load_tokenizer

    return load_tokenizer(str(_tokenizer_dir(reference)))


def _chat(tok: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    from edgeft.data import FALLBACK_CHAT_TEMPLATE

    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                   chat_template=tok.chat_template or FALLBACK_CHAT_TEMPLATE)


def tokenizer_samples(tok: Any) -> list[str]:
    return [*TOKENIZER_SAMPLES, _chat(tok, TOKENIZER_CHAT_SAMPLE, generation_prompt=False)]


def check_tokenizers(tok: Any, reference: Artifact, artifacts: list[Artifact]) -> None:
    """Every artifact must turn the sample texts into the reference's token ids (one error for all)."""
    from edgeft.models import load_tokenizer

    from runtime.backends import gguf_tokenize

    texts = tokenizer_samples(tok)
    want = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    problems = []
    for art in artifacts:
        if art.kind == GGUF:
            got = gguf_tokenize(art.path, texts)
            sizes_differ = False
        else:
            tdir = _tokenizer_dir(art)
            if tdir is None or not _has_tokenizer(tdir):
                continue  # nothing to compare: the run feeds the reference's ids regardless
            other = load_tokenizer(str(tdir))
            got = [list(other(t, add_special_tokens=False)["input_ids"]) for t in texts]
            sizes_differ = len(other) != len(tok)
        bad = [i for i, (a, b) in enumerate(zip(want, got)) if a != b]
        if bad or sizes_differ:
            where = f"sample {texts[bad[0]][:30]!r}" if bad else "vocabulary size"
            problems.append(f"tokenizer of --artifact {art.path} differs from the tokenizer of --reference "
                            f"{reference.path} ({where}); bench feeds the reference's token ids to every artifact, "
                            "so they must share one tokenizer")
    if problems:
        raise EdgeftError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# 2. Evaluation rows


@dataclass
class EvalRow:
    line: int
    ids: list[int]  # prompt + answer + end of turn
    prompt_len: int
    compare_from: int  # first position whose logits are compared (start of the last user turn)
    answer: str

    def spec(self) -> dict[str, Any]:
        return {"ids": self.ids, "prompt_len": self.prompt_len, "compare_from": self.compare_from}


@dataclass
class EvalSet:
    path: Path
    rows: list[EvalRow]
    stop_ids: list[int]
    answer_tokens: int
    total_rows: int  # rows in the file before --max-rows

    @property
    def positions(self) -> int:
        return sum(len(r.ids) - 1 - r.compare_from for r in self.rows)

    @property
    def max_tokens(self) -> int:
        return max(max(len(r.ids), r.prompt_len + self.answer_tokens) for r in self.rows)


def eval_set(tok: Any, path: Path, max_rows: int | None, answer_tokens: int, model_dir: Path | None = None) -> EvalSet:
    """Tokenise the evaluation rows once, with the reference tokenizer (bad rows: file:line errors).

    ``model_dir`` is where the reference's generation_config.json (extra end-of-turn ids) lives.
    """
    from edgeft.data import load_rows

    rows, _ = load_rows(path)
    total = len(rows)
    rows = rows[:max_rows] if max_rows else rows
    stop = stop_ids(tok, model_dir)
    if not stop:
        raise EdgeftError("--reference: its tokenizer has no end-of-sequence token, so answers could not stop")
    eos = stop[0]
    out = []
    for row in rows:
        if row.messages is not None:
            last = max(i for i, m in enumerate(row.messages) if m["role"] == "assistant")
            answer = row.messages[last]["content"]
            text = _chat(tok, row.messages[:last], generation_prompt=True)
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            prompt = list(enc["input_ids"])
            users = [m["content"] for m in row.messages[:last] if m["role"] == "user"]
            start = text.rfind(users[-1]) if users else -1
            compare_from = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > start), 0) if start >= 0 else 0
        elif row.prompt is not None:
            answer, prompt, compare_from = row.completion or "", list(tok(row.prompt)["input_ids"]), 0
        else:
            raise DataError(f"{path}:{row.line}: a plain-text row has no reference answer; bench needs instruction, "
                            "chat or prompt/completion rows")
        answer_ids = list(tok(answer, add_special_tokens=False)["input_ids"]) + [eos]
        ids = prompt + answer_ids
        # Very long rows: compare their last positions only. The answer positions (P-1 .. T-2)
        # are always compared.
        compare_from = max(compare_from, len(ids) - 1 - MAX_COMPARED_PER_ROW)
        compare_from = max(0, min(compare_from, len(prompt) - 1))
        out.append(EvalRow(row.line, ids, len(prompt), compare_from, answer))
    return EvalSet(Path(path), out, stop, answer_tokens, total)


def stop_ids(tok: Any, model_dir: Path | None = None) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS first, then generation_config's (chat models end turns with them)."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    path = Path(model_dir or "") / "generation_config.json"
    if model_dir is not None and path.is_file():
        try:
            eos = json.loads(path.read_text()).get("eos_token_id")
        except ValueError:
            eos = None
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def latency_prompt(tok: Any, n: int) -> list[int]:
    """Exactly ``n`` token ids: LATENCY_TEXT in a chat turn (repeated as needed), cut to length."""
    text = LATENCY_TEXT
    while True:
        ids = list(tok(_chat(tok, [{"role": "user", "content": text}], generation_prompt=True),
                       add_special_tokens=False)["input_ids"])
        if len(ids) >= n:
            return ids[:n]
        text = f"{text} {LATENCY_TEXT}"


# ---------------------------------------------------------------------------------------------
# 4. Workers


@dataclass
class WorkerPlan:
    work: Path
    threads: int
    prompt: list[int]
    cfg: BenchConfig
    evals: EvalSet
    max_tokens: int

    @property
    def logits_file(self) -> Path:
        return self.work / "reference_logits.npy"


def run_worker(plan: WorkerPlan, art: Artifact, *, reference: bool, index: int) -> dict[str, Any]:
    """Run ``runtime.worker`` on ``art`` in a fresh process and return its result."""
    from edgeft.fsutil import write_json

    cfg = plan.cfg
    spec = {
        "name": art.name, "kind": art.kind, "path": str(art.path), "threads": plan.threads,
        "max_tokens": -(-plan.max_tokens // 64) * 64,
        "latency": {"prompt": plan.prompt, "new_tokens": cfg.new_tokens, "warmup": cfg.warmup, "repeats": cfg.repeats},
        "accuracy": {"rows": [r.spec() for r in plan.evals.rows], "answer_tokens": cfg.answer_tokens,
                     "stop_ids": plan.evals.stop_ids, "logits_file": str(plan.logits_file), "write_logits": reference},
    }
    spec_path, out_path = plan.work / f"spec-{index}.json", plan.work / f"result-{index}.json"
    write_json(spec_path, spec)
    out_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runtime.worker", str(spec_path), str(out_path)],
                          env=worker_env(plan.threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {}
    if out_path.is_file():
        try:
            result = json.loads(out_path.read_text())
        except ValueError:
            result = {}
    if proc.returncode != 0 or "error" in result or not result:
        if cfg.keep_work:
            (plan.work / f"stderr-{index}.log").write_text(proc.stderr)
        msg = result.get("error") or _last_line(proc.stderr) or f"worker exited with status {proc.returncode}"
        role = "--reference" if reference else "--artifact"
        raise EdgeftError(f"{role} {art.path}: benchmark failed: {msg}")
    result["worker_wall_s"] = wall
    return result


def worker_env(threads: int) -> dict[str, str]:
    """The worker's environment: this package importable, thread pools sized, libraries quiet."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", PYTHONWARNINGS="ignore", GGML_NO_BACKTRACE="1")
    return env


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:400] if lines else ""


def _one_line_summary(art: Artifact, res: dict[str, Any]) -> str:
    lat, acc = res.get("latency", {}), res.get("accuracy", {})
    return (f"    decode {lat.get('decode_tokens_per_s', float('nan')):.1f} tok/s, "
            f"TTFT {1000 * lat.get('ttft_s', float('nan')):.0f} ms, top-1 {acc.get('top1_agreement', float('nan')):.4f}, "
            f"peak RSS {res.get('peak_rss_bytes', 0) / 2**20:.0f} MiB")


# ---------------------------------------------------------------------------------------------
# 5. Report


LATENCY_FIELDS = ("ttft_s", "ttft_s_min", "ttft_s_max", "ttft_s_spread",
                  "prompt_tokens_per_s", "prompt_tokens_per_s_min", "prompt_tokens_per_s_max", "prompt_tokens_per_s_spread",
                  "decode_tokens_per_s", "decode_tokens_per_s_min", "decode_tokens_per_s_max", "decode_tokens_per_s_spread",
                  "token_latency_p50_s", "token_latency_p95_s")


def assemble(cfg: BenchConfig, reference: Artifact, artifacts: list[Artifact], records: dict[str, Any],
             results: list[dict[str, Any]], evals: EvalSet, tok: Any, machine: dict[str, Any],
             versions: dict[str, str], threads: int, prompt: list[int]) -> dict[str, Any]:
    """The report: one entry per model (reference first) plus machine, workload and bars."""
    from edgeft.tasks import normalise_answer

    bandwidth = machine["bandwidth"]["read_gbps"] * 1e9
    ref_gen = results[0]["accuracy"]["generations"]
    entries = []
    for i, (art, res) in enumerate(zip([reference, *artifacts], results)):
        lat, acc = res["latency"], res["accuracy"]
        gens = acc["generations"]
        texts = [tok.decode([t for t in g if t not in evals.stop_ids], skip_special_tokens=True) for g in gens]
        hits = [normalise_answer(t) == normalise_answer(r.answer) for t, r in zip(texts, evals.rows)]
        per_token = res["weights"]["per_token"]
        limit = bandwidth / per_token if per_token else float("nan")
        record = records.get(str(art.path)) if i else None
        entry: dict[str, Any] = {
            "name": art.name, "role": "reference" if i == 0 else "artifact", "path": str(art.path),
            "kind": art.kind, "backend": art.backend, "precision": art.precision,
            "precision_class": None if i == 0 else precision_class(art.kind, art.precision),
            "size_bytes": art.size_bytes, "weight_bytes": res["weights"]["total"],
            "weight_bytes_per_token": per_token, "weight_bytes_source": res["weights"]["source"],
            "import_s": res.get("import_s"), "load_s": res["load_s"],
            **{k: lat.get(k) for k in LATENCY_FIELDS},
            "peak_rss_bytes": res["peak_rss_bytes"], "peak_rss_total_bytes": res.get("peak_rss_total_bytes"),
            "bandwidth_limit_tokens_per_s": limit,
            "bandwidth_fraction": lat["decode_tokens_per_s"] / limit if limit == limit and limit else None,
            "task_accuracy": sum(hits) / len(hits) if hits else None,
            "perplexity": acc["perplexity"],
            "top1_agreement": acc["top1_agreement"], "mean_kl": acc["mean_kl"], "max_kl": acc["max_kl"],
            "max_abs_logit_diff": acc["max_abs_diff"], "compared_positions": acc["positions"],
            "generation_agreement": sum(a == b for a, b in zip(gens, ref_gen)) / len(gens) if gens else None,
            "verification": None if i == 0 else (record or {}).get("status", "missing"),
            "threads": res["threads"], "torch_imported": res.get("torch_imported"),
            "worker_wall_s": res.get("worker_wall_s"),
            "latency_runs": lat.get("runs"),
            "answers": [{"line": r.line, "reference": r.answer, "generated": t, "correct": h}
                        for r, t, h in zip(evals.rows, texts, hits)][:20],
        }
        entries.append(entry)
    ref = entries[0]
    for e in entries:
        e["decode_speedup_vs_reference"] = _ratio(e["decode_tokens_per_s"], ref["decode_tokens_per_s"])
        e["ttft_ratio_vs_reference"] = _ratio(e["ttft_s"], ref["ttft_s"])
        e["size_ratio_vs_reference"] = _ratio(e["size_bytes"], ref["size_bytes"])
        if e["role"] == "reference":
            e["top1_bar"], e["flags"] = None, []
        else:
            e["top1_bar"] = top1_bar(e["kind"], e["precision"], cfg.top1_overrides)
            e["flags"] = flags_for(e, ref["task_accuracy"], top1_overrides=cfg.top1_overrides,
                                   max_accuracy_drop=cfg.max_accuracy_drop)
        e["flagged"] = bool(e["flags"])
    return {
        "edgeft_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reference": str(reference.path),
        "machine": machine, "versions": versions, "threads": threads,
        "workload": {
            "latency": {"batch": 1, "prompt_tokens": len(prompt), "new_tokens": cfg.new_tokens, "eos_ignored": True,
                        "warmup": cfg.warmup, "repeats": cfg.repeats, "statistic": "median over repeats; min/max beside"},
            "accuracy": {"data": str(evals.path), "rows": len(evals.rows), "rows_in_file": evals.total_rows,
                         "compared_positions": evals.positions, "answer_tokens": cfg.answer_tokens,
                         "compared_from": "start of the last user turn (shared system prompt excluded)",
                         "stop_ids": evals.stop_ids},
        },
        "thresholds": {"top1_min_by_class": TOP1_MIN, "top1_overrides": cfg.top1_overrides,
                       "max_accuracy_drop": cfg.max_accuracy_drop},
        "bandwidth_note": ("decode limit = read bandwidth / weight bytes streamed per token (all weights, less an "
                           "input-embedding table that is only gathered; KV cache and activations ignored)"),
        "entries": entries,
        "flagged": [e["name"] for e in entries if e["flagged"]],
        "config": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                   for k, v in asdict(cfg).items()},
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
