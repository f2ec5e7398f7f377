"""`edgeft serve` against llama-cpp-python's own OpenAI server (the anchor), the same GGUF, same threads.

Both servers run as subprocesses on 127.0.0.1; for each concurrency (1, 4, 16 clients) every
client sends chat completions (temperature 0, the same prompts) back to back; after a warm-up, the
figures are completion tokens per second of wall time (from the answers' usage counts) and p50/p95
request latency, plus failed requests. Target: edgeft ≥ 0.9× the anchor's tokens/s at every
concurrency, no failed request.

    .venv/bin/pip install -c constraints.txt -e ".[bench]"     # the anchor's [server] extras
    .venv/bin/python benchmarks/bench_serve.py --threads 2 --requests-per-client 4
    .venv/bin/python benchmarks/bench_serve.py --threads 2 --adapters 2      # with adapter switching

The default GGUF is the embedded SmolLM2-135M-Instruct (no verification record: served with
--allow-unverified); pass --gguf FILE for an exported one.

``--adapters N`` builds N task adapters from random LoRA weights on the GGUF's Hugging Face model
and exports them with ``edgeft export gguf-lora`` (which needs a verified base: an exported
``--gguf``, or else the embedded model re-exported as q8_0 once into ``--output``); edgeft's
consecutive requests then cycle through the base and every adapter. llama-cpp-python's server
loads a LoRA with the model and cannot switch it per request without reloading, so the anchor
serves the plain base, as the table says.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["Give me two tips for a good night's sleep.", "What is the capital of France? Answer in one sentence.",
           "Write a haiku about autumn leaves.", "Explain photosynthesis to a child."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(cmd: list[str], port: int, log: Path) -> Iterator[str]:
    """A server subprocess, waited for until it answers /v1/models, stopped at the end."""
    import httpx

    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > t_end:
                raise RuntimeError(f"server did not start: {' '.join(cmd)} (see {log})")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def load(url: str, models: list[str], clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` threads each sending ``per_client`` requests, each client's consecutive requests cycling
    through ``models``; tokens/s, latency percentiles, failures."""
    import httpx

    def client(i: int) -> list[tuple[float, int] | None]:
        out: list[tuple[float, int] | None] = []
        with httpx.Client(timeout=300) as http:
            for j in range(per_client):
                body = {"model": models[(i + j) % len(models)], "max_tokens": max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}]}
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/chat/completions", json=body)
                ok = r.status_code == 200
                out.append((time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]) if ok else None)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for chunk in pool.map(client, range(clients)) for x in chunk]
    wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    lat = sorted(r[0] for r in done)
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(done),
            "tokens": sum(r[1] for r in done), "tokens_per_s": sum(r[1] for r in done) / wall,
            "p50_s": statistics.median(lat) if lat else None,
            "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None}


def run_one(name: str, cmd: list[str], port: int, models: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    served = "base" if len(models) == 1 else f"base + {len(models) - 1} adapters, switched per request"
    with server(cmd, port, args.output / f"{name}.log") as url:
        load(url, models, 1, 2, args.max_tokens)  # warm-up
        for clients in args.clients:
            row = {"server": name, "models": served,
                   **load(url, models, clients, args.requests_per_client, args.max_tokens)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def adapter_base(gguf: Path | None, output: Path) -> tuple[Path, str]:
    """(a verified GGUF to serve, the Hugging Face model it was exported from) for ``--adapters``."""
    from edgeft.core.errors import EdgeftError
    from edgeft.core.records import read_record
    from edgeft.models import resolve_model
    from export.gguf import export_gguf

    if gguf is not None:
        try:
            return gguf, str(read_record(gguf)["reference"])
        except EdgeftError as e:
            raise SystemExit(f"--adapters: the adapters need a verified base GGUF ({e.format_message()}); "
                             "export it with `edgeft export gguf`, or omit --gguf") from None
    hf = resolve_model(None)  # the embedded model's Hugging Face conversion
    exported = output / "base.q8_0.gguf"
    if not exported.is_file():
        print(f"exporting the embedded model as {exported} (the adapters' verified base)", flush=True)
        export_gguf(Path(hf), exported, qtype="q8_0")
    return exported, hf


def random_adapter(hf: str, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter (r=8, every linear layer) with small random weights on ``hf``, saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero (no change): move the model a little
                param.normal_(std=0.02)
    peft_model.save_pretrained(out)
    return out


def export_adapters(n: int, gguf: Path, hf: str, output: Path) -> dict[str, Path]:
    """``n`` random task adapters as verified .lora.gguf files for ``gguf``: {name: file}."""
    from export.gguf_lora import export_gguf_lora

    files = {}
    for i in range(n):
        name = f"task{i}"
        adapter = random_adapter(hf, output / "adapters" / name, seed=i)
        files[name] = output / f"{name}.lora.gguf"
        record = export_gguf_lora(adapter, gguf, files[name], overwrite=True)
        print(f"{files[name].name}: verification {record.status}", flush=True)
    return files


def main() -> None:
    from edgeft.models import default_gguf_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--slots", type=int, default=1, help="edgeft decoding slots (threads are split among them)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--adapters", type=int, default=0,
                   help="task adapters (random LoRA) that edgeft's consecutive requests switch between with the base")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/serve")
    args = p.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf or default_gguf_path()
    adapters: dict[str, Path] = {}
    if args.adapters > 0:
        gguf, hf = adapter_base(args.gguf, args.output)
        adapters = export_adapters(args.adapters, gguf, hf, args.output)
    py = sys.executable
    e_port, a_port = free_port(), free_port()
    edgeft_cmd = [py, "-m", "edgeft.cli", "serve", str(gguf), "--port", str(e_port), "--slots", str(args.slots),
                  "--threads", str(max(1, args.threads // args.slots)), "--ctx", str(args.ctx),
                  "--queue", "64", "--timeout", "600", "--name", "m", "--allow-unverified"]
    for name, path in adapters.items():
        edgeft_cmd += ["--adapter", f"{name}={path}"]
    anchor_cmd = [py, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(a_port), "--model_alias", "m",
                  "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx)]
    if adapters:
        print("the anchor serves the plain base: llama-cpp-python's server cannot switch LoRA adapters per request "
              "without reloading the model", flush=True)
    rows = run_one("llama-cpp-python server", anchor_cmd, a_port, ["m"], args)
    rows += run_one("edgeft serve", edgeft_cmd, e_port, ["m", *adapters], args)
    anchor = {r["clients"]: r for r in rows if r["server"] != "edgeft serve"}
    for r in rows:
        if r["server"] == "edgeft serve":
            r["vs_anchor"] = r["tokens_per_s"] / anchor[r["clients"]]["tokens_per_s"]
    summary = {"gguf": str(gguf), "threads": args.threads, "slots": args.slots, "max_tokens": args.max_tokens,
               "adapters": {name: str(path) for name, path in adapters.items()},
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}, "rows": rows}
    (args.output / "serve.json").write_text(json.dumps(summary, indent=2))
    print("| server | models served | clients | requests | failed | tokens/s | p50 s | p95 s | vs anchor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_anchor']:.2f}×" if "vs_anchor" in r else "1.00×"
        print(f"| {r['server']} | {r['models']} | {r['clients']} | {r['requests']} | {r['failed']} | "
              f"{r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {vs} |")


if __name__ == "__main__":
    main()
