"""`edgeft serve` and `edgeft export gguf-lora`: a real server on 127.0.0.1 (a free port), the official
openai client, answers compared with the runtime's own greedy decoding; every server is stopped at
the end of its test (``running_server`` is a context manager)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from conftest import make_adapter
from edgeft.core.errors import EdgeftError
from runtime.backends import GgufBackend, greedy
from runtime.serve import ServeConfig, running_server
from runtime.serve import engine as engine_module

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
HI = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def base_gguf(tmp_path_factory, tiny_llama_dir) -> Path:
    from export.gguf import export_gguf

    out = tmp_path_factory.mktemp("serve") / "tiny.f16.gguf"
    assert export_gguf(tiny_llama_dir, out, qtype="f16").status == "passed"
    return out


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_llama_dir, base_gguf) -> dict[str, Path]:
    from export.gguf_lora import export_gguf_lora

    root = tmp_path_factory.mktemp("loras")
    out = {}
    for seed, name in ((1, "sentiment"), (2, "topic")):
        adapter = make_adapter(tiny_llama_dir, root / name, qlora=False, seed=seed)
        out[name] = root / f"{name}.lora.gguf"
        record = export_gguf_lora(adapter, base_gguf, out[name])
        assert record.status == "passed", record.summary()
    return out


@pytest.fixture
def tok(tiny_llama_dir):
    from runtime.modelfiles import load_tokenizer

    return load_tokenizer(str(tiny_llama_dir))


def _config(artifact: Path, **kw) -> ServeConfig:
    kw.setdefault("threads", 1)
    return ServeConfig(artifact=artifact, port=0, api_key=KEY, **kw)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30)


def _expected(gguf: Path, tok, stop_ids, *, adapter: Path | None = None, max_new: int = 16,
              messages: list[dict] = HI) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of the runtime's greedy decoding of ``messages`` (a fresh cache)."""
    backend = GgufBackend(gguf, threads=1, n_ctx=256)
    try:
        if adapter is not None:
            backend.load_adapter("task", adapter)
            backend.use_adapter("task")
        return _greedy_answer(backend, tok, stop_ids, max_new, messages)
    finally:
        backend.close()


def _greedy_answer(backend, tok, stop_ids, max_new: int = 16, messages: list[dict] = HI) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of ``backend``'s greedy decoding of ``messages``."""
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    ids = greedy(backend, prompt, max_new, stop_ids=sorted(stop_ids))
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=True), len(prompt), len(ids)


def _stream_text(stream) -> str:
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_chat_answers_equal_runtime_greedy(base_gguf, tok):
    with running_server(_config(base_gguf, slots=2)) as (engine, url):
        client = _client(url)
        text, n_prompt, n_new = _expected(base_gguf, tok, engine.codec.stop_ids)
        whole = client.chat.completions.create(model=engine.model_id, messages=HI, max_tokens=16, temperature=0)
        assert whole.choices[0].message.content == text
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (n_prompt, n_new)
        stream = client.chat.completions.create(model=engine.model_id, messages=HI, max_tokens=16, temperature=0,
                                                stream=True)
        assert _stream_text(stream) == text
        # sampling with a seed repeats itself; a stop string cuts the answer before it
        seeded = [client.chat.completions.create(model=engine.model_id, messages=HI, max_tokens=8, temperature=0.9,
                                                 top_p=0.9, seed=7).choices[0].message.content for _ in range(2)]
        assert seeded[0] == seeded[1]
        cut = client.chat.completions.create(model=engine.model_id, messages=HI, max_tokens=16, temperature=0,
                                             stop=[text[3:6]])
        assert cut.choices[0].message.content == text[: text.index(text[3:6])]
        assert cut.choices[0].finish_reason == "stop"
        done = client.completions.create(model=engine.model_id, prompt="Once upon a time", max_tokens=5, temperature=0)
        assert done.usage.completion_tokens == 5 and done.choices[0].finish_reason == "length"
        assert [m.id for m in client.models.list()] == [engine.model_id]
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["slots"] == 2
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert 'edgeft_requests_total{endpoint="chat",status="200"} 5' in metrics
        assert "edgeft_request_seconds_bucket" in metrics and 'edgeft_tokens_total{kind="completion"}' in metrics


def test_adapters_alternate_without_reloading(base_gguf, lora_files, tok):
    cfg = _config(base_gguf, adapters=lora_files)
    with running_server(cfg) as (engine, url):
        client = _client(url)
        want = {name: _expected(base_gguf, tok, engine.codec.stop_ids, adapter=path)[0]
                for name, path in lora_files.items()}
        want[engine.model_id] = _expected(base_gguf, tok, engine.codec.stop_ids)[0]
        assert len(set(want.values())) == 3  # each adapter answers differently
        for name in ["sentiment", "topic", "sentiment", engine.model_id, "topic"]:
            answer = client.chat.completions.create(model=name, messages=HI, max_tokens=16, temperature=0)
            assert answer.choices[0].message.content == want[name], name
        assert sorted(m.id for m in client.models.list()) == sorted([engine.model_id, *lora_files])


def test_gguf_lora_file_is_llama_cpp_adapter_format(lora_files):
    import gguf

    from edgeft.core.records import passed_and_bound

    path = lora_files["topic"]
    reader = gguf.GGUFReader(str(path))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("general.type"), field("adapter.type"), field("adapter.lora.alpha")) == ("adapter", "lora", 8.0)
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.1.ffn_down.weight.lora_b"} <= names
    assert len(names) == 2 * 2 * 7  # 2 layers x 7 linear layers x (a, b)
    assert passed_and_bound(path)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_shared_prompt_prefix_is_not_evaluated_again(base_gguf, lora_files, tok):
    system = {"role": "system", "content": "You answer questions about colours, briefly and politely. " * 4}
    asks = [[system, {"role": "user", "content": q}] for q in ("Name three colours.", "Name two animals.")]
    prompts = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True)) for m in asks]
    shared = next(i for i, (a, b) in enumerate(zip(*prompts)) if a != b)
    assert shared > 40
    with running_server(_config(base_gguf, adapters=lora_files)) as (engine, url):  # one slot: one cache
        client = _client(url)
        calls = [(engine.model_id, asks[0]), (engine.model_id, asks[1]), ("topic", asks[1]), ("topic", asks[1])]
        got, reused = [], []
        for model, messages in calls:
            answer = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
            got.append(answer.choices[0].message.content)
            reused.append(_metric(url, "edgeft_prompt_tokens_reused_total") - sum(reused))
        want = [_expected(base_gguf, tok, engine.codec.stop_ids, messages=m, max_new=12,
                          adapter=lora_files["topic"] if model == "topic" else None)[0] for model, m in calls]
    assert got == want  # each answer as from a fresh cache
    # a fresh cache, the shared prefix, a new adapter (other weights: nothing kept), the whole prompt but its last token
    assert reused == [0, shared, 0, len(prompts[1]) - 1]


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft")
    return {name: make_adapter(tiny_llama_dir, root / name, qlora=False, seed=seed)
            for seed, name in ((1, "sentiment"), (2, "topic"))}


def test_peft_adapters_selected_per_request_on_a_pytorch_base(tiny_llama_dir, peft_adapters, tok):
    from runtime.artifacts import MERGED, UNMERGED
    from runtime.backends import TorchBackend

    cfg = _config(tiny_llama_dir, adapters=peft_adapters, slots=2, name="base")
    with running_server(cfg) as (engine, url):
        stop = engine.codec.stop_ids
        want = {name: _greedy_answer(TorchBackend(path, kind=UNMERGED, threads=1), tok, stop, 8)[0]
                for name, path in peft_adapters.items()}  # each adapter alone, as `edgeft train` left it
        want["base"] = _greedy_answer(TorchBackend(tiny_llama_dir, kind=MERGED, threads=1), tok, stop, 8)[0]
        assert len(set(want.values())) == 3
        client = _client(url)

        def ask(model: str) -> str:
            return client.chat.completions.create(model=model, messages=HI, max_tokens=8, temperature=0
                                                  ).choices[0].message.content

        order = ["sentiment", "topic", "base", "topic", "sentiment", "base"]
        assert [ask(m) for m in order] == [want[m] for m in order]
        with ThreadPoolExecutor(4) as pool:  # two slots decode different adapters on the same weights at once
            assert list(pool.map(ask, order * 2)) == [want[m] for m in order * 2]
        assert sorted(m.id for m in client.models.list()) == ["base", "sentiment", "topic"]


def test_adapters_must_fit_the_served_base(tmp_path, tiny_llama_dir, smol_tokenizer_dir, base_gguf, peft_adapters):
    from conftest import make_tiny_llama

    from runtime.serve.engine import Engine

    other = make_tiny_llama(tmp_path / "wide", smol_tokenizer_dir, hidden=96)
    wrong = make_adapter(other, tmp_path / "wrong", qlora=False)
    kw = dict(slots=1, threads=1, n_ctx=128, allow_unverified=False)
    with pytest.raises(EdgeftError, match=r"--adapter x=.*wrong: trained on .*wide, not on .*hidden_size 96 vs 64"):
        Engine(tiny_llama_dir, adapters={"x": wrong}, **kw)
    with pytest.raises(EdgeftError, match="not a GGUF adapter file"):
        Engine(base_gguf, adapters={"x": peft_adapters["topic"]}, **kw)
    with pytest.raises(EdgeftError, match="not a PEFT adapter directory"):
        Engine(tiny_llama_dir, adapters={"x": base_gguf}, **kw)
    with pytest.raises(EdgeftError, match="no verification record"):  # without adapters, a plain model is unverified
        Engine(tiny_llama_dir, **kw)


def test_gguf_lora_eval_rows_decide_with_task_accuracy(tmp_path, tiny_llama_dir, base_gguf, tok):
    """Rows whose answers are the merged model's own greedy answers: the reference scores 100%; the record's
    task accuracy of the base GGUF + adapter is that of llama.cpp's own greedy answers, computed here apart.
    (The random tiny model has near-ties that llama.cpp's f16 weights and KV cache may flip, so a row or two
    can differ.)"""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgeft.core.answers import normalise_answer
    from export.evalrows import load_eval_rows, reference_answers
    from export.gguf_lora import export_gguf_lora

    adapter = make_adapter(tiny_llama_dir, tmp_path / "task", qlora=False, seed=3)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                                       str(adapter)).merge_and_unload().eval()
    rows = [{"instruction": f"Colour of item {i}?", "output": "?"} for i in range(8)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = load_eval_rows(data, tok)
    for row, ids in zip(rows, reference_answers(merged, tok, evals).answers):
        row["output"] = tok.decode([t for t in ids if t not in evals.stop_ids], skip_special_tokens=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "task.lora.gguf"
    record = export_gguf_lora(adapter, base_gguf, out, eval_data=data)
    on_rows = record.metrics["eval_rows"]
    backend = GgufBackend(base_gguf, threads=1, n_ctx=256)
    try:
        backend.load_adapter("task", out)
        backend.use_adapter("task")
        answers = [greedy(backend, r.ids[: r.prompt_len], 16, evals.stop_ids) for r in load_eval_rows(data, tok).rows]
    finally:
        backend.close()
    texts = [tok.decode([t for t in a if t not in evals.stop_ids], skip_special_tokens=True) for a in answers]
    hits = [normalise_answer(t) == normalise_answer(r["output"]) for t, r in zip(texts, rows)]
    assert on_rows["rows"] == 8 and on_rows["reference_task_accuracy"] == 1.0
    assert on_rows["task_accuracy"] == sum(hits) / 8 >= 0.5  # the adapter is applied: the base alone scores 0
    diff = on_rows["task_accuracy_diff"]
    assert diff["difference"] == on_rows["task_accuracy"] - 1.0 and diff["low"] <= diff["difference"] <= diff["high"]
    checks = {c.name: c for c in record.checks}  # the rows decide; the generic samples stay recorded
    assert checks["top1_agreement"].value == round(on_rows["top1_agreement"], 4) and "logits" in record.metrics
    assert checks["task_accuracy_supported_drop"].value == round(on_rows["supported_drop"], 4)


def test_key_required(base_gguf):
    with running_server(_config(base_gguf)) as (engine, url):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.post(f"{url}/v1/chat/completions", headers=headers,
                           json={"model": engine.model_id, "messages": HI})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(f"{url}/health").status_code == 200


def test_malformed_requests_get_4xx(base_gguf):
    with running_server(_config(base_gguf, max_body_bytes=4096, max_prompt_tokens=64)) as (engine, url):
        m = engine.model_id
        ok = {"model": m, "messages": HI}
        cases = {
            "bad json": (b"{not json", 400),
            "not an object": (b"[1, 2]", 400),
            "model wrong type": (json.dumps({**ok, "model": 3}), 400),
            "messages missing": (json.dumps({"model": m}), 400),
            "messages empty": (json.dumps({**ok, "messages": []}), 400),
            "bad role": (json.dumps({**ok, "messages": [{"role": "robot", "content": "x"}]}), 400),
            "unknown model": (json.dumps({**ok, "model": "nope"}), 404),
            "negative max_tokens": (json.dumps({**ok, "max_tokens": -1}), 400),
            "string temperature": (json.dumps({**ok, "temperature": "0.5"}), 400),
            "top_p out of range": (json.dumps({**ok, "top_p": 1.5}), 400),
            "n > 1": (json.dumps({**ok, "n": 2}), 400),
            "five stops": (json.dumps({**ok, "stop": list("abcde")}), 400),
            "prompt over limit": (json.dumps({**ok, "messages": [{"role": "user", "content": "word " * 200}]}), 400),
            "answer over context": (json.dumps({**ok, "max_tokens": 10_000}), 400),
            "body too large": (json.dumps({**ok, "pad": "x" * 5000}), 413),
        }
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        for name, (body, status) in cases.items():
            r = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)
            assert r.status_code == status, (name, r.text)
            assert r.json()["error"]["message"], name
        r = httpx.post(f"{url}/v1/completions", headers=headers, json={"model": m, "prompt": ["a", "b"]})
        assert r.status_code == 400
        assert httpx.get(f"{url}/v1/nowhere", headers=headers).status_code == 404
        assert httpx.get(f"{url}/v1/chat/completions", headers=headers).status_code == 405
        assert "500" not in httpx.get(f"{url}/metrics", headers=headers).text


@pytest.fixture
def gate(monkeypatch):
    """Decoding waits for ``gate.set()`` before each token: a request holds its slot until the test lets go."""
    event = threading.Event()
    advance = engine_module.Decoding.advance

    def gated(self):
        event.wait(10)
        return advance(self)

    monkeypatch.setattr(engine_module.Decoding, "advance", gated)
    yield event
    event.set()


def _open_stream(url: str, model: str, http: httpx.Client, max_tokens: int = 8):
    body = {"model": model, "messages": HI, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    request = http.build_request("POST", f"{url}/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEY}"})
    return http.send(request, stream=True)


def test_full_queue_answers_429_then_503(base_gguf, gate):
    with running_server(_config(base_gguf, slots=1, queue=0)) as (engine, url), httpx.Client(timeout=20) as http:
        held = _open_stream(url, engine.model_id, http)
        assert held.status_code == 200
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": engine.model_id, "messages": HI},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 429 and r.headers["Retry-After"] and r.json()["error"]["code"] == "queue_full"
        gate.set()
        assert "[DONE]" in held.read().decode()
        held.close()
    gate.clear()
    with running_server(_config(base_gguf, slots=1, queue=1, timeout=0.5)) as (engine, url), \
            httpx.Client(timeout=20) as http:
        held = _open_stream(url, engine.model_id, http)
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": engine.model_id, "messages": HI},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and r.headers["Retry-After"]
        gate.set()
        held.close()


def test_dropped_stream_frees_its_slot(base_gguf, tok, monkeypatch):
    advance = engine_module.Decoding.advance
    monkeypatch.setattr(engine_module.Decoding, "advance", lambda self: (time.sleep(0.01), advance(self))[1])
    with running_server(_config(base_gguf, slots=1, queue=0)) as (engine, url), httpx.Client(timeout=20) as http:
        dropped = _open_stream(url, engine.model_id, http, max_tokens=400)
        lines = dropped.iter_lines()
        assert next(lines).startswith("data:")
        dropped.close()  # the client goes away mid-answer
        t_end = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["slots_busy"] and time.monotonic() < t_end:
            time.sleep(0.05)
        answer = _client(url).chat.completions.create(model=engine.model_id, messages=HI, max_tokens=4, temperature=0)
        assert answer.choices[0].finish_reason in ("length", "stop")


def test_load_64_requests_from_8_clients_lose_nothing(base_gguf, tok):
    with running_server(_config(base_gguf, slots=2, queue=16)) as (engine, url):
        text = _expected(base_gguf, tok, engine.codec.stop_ids, max_new=8)[0]
        client = _client(url)

        def one(i: int) -> str:
            kw = dict(model=engine.model_id, messages=HI, max_tokens=8, temperature=0)
            if i % 2:
                return _stream_text(client.chat.completions.create(stream=True, **kw))
            return client.chat.completions.create(**kw).choices[0].message.content

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(64)))
        assert answers == [text] * 64
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert 'edgeft_requests_total{endpoint="chat",status="200"} 64' in metrics


def test_refuses_missing_failed_or_stale_records(base_gguf, tmp_path):
    from runtime.serve.engine import Engine

    copy = tmp_path / base_gguf.name
    shutil.copy(base_gguf, copy)
    with pytest.raises(EdgeftError, match="no verification record"):
        Engine(copy, slots=1, threads=1, n_ctx=128, allow_unverified=False)
    Engine(copy, slots=1, threads=1, n_ctx=128, allow_unverified=True).close()
    record = json.loads(Path(f"{base_gguf}.verify.json").read_text())
    Path(f"{copy}.verify.json").write_text(json.dumps({**record, "status": "failed"}))
    with pytest.raises(EdgeftError, match="failed verification"):
        Engine(copy, slots=1, threads=1, n_ctx=128, allow_unverified=False)
    Path(f"{copy}.verify.json").write_text(json.dumps(record))
    with open(copy, "r+b") as fh:  # one byte of the weights changes
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(EdgeftError, match="changed since it was verified"):
        Engine(copy, slots=1, threads=1, n_ctx=128, allow_unverified=False)


def test_cli_serve_refuses_unverified(tmp_path, base_gguf):
    from click.testing import CliRunner

    from edgeft.cli import cli

    copy = tmp_path / "m.gguf"
    shutil.copy(base_gguf, copy)
    result = CliRunner().invoke(cli, ["serve", str(copy)])
    assert result.exit_code == 1 and "--allow-unverified" in result.output
    result = CliRunner().invoke(cli, ["serve", str(base_gguf), "--adapter", "x"])
    assert result.exit_code == 2 and "NAME=FILE" in result.output


def test_gguf_and_onnx_paths_import_no_torch(base_gguf, tmp_path, tiny_llama_dir):
    from export.onnx import export_onnx

    onnx_dir = tmp_path / "onnx"
    assert export_onnx(tiny_llama_dir, onnx_dir).status == "passed"
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        import httpx
        from runtime.serve import ServeConfig, running_server
        for art in [{str(base_gguf)!r}, {str(onnx_dir)!r}]:
            with running_server(ServeConfig(artifact=Path(art), port=0, threads=1)) as (engine, url):
                r = httpx.post(url + "/v1/chat/completions",
                               json={{"model": engine.model_id, "messages": [{{"role": "user", "content": "hi"}}],
                                     "max_tokens": 4, "stream": True}})
                assert r.status_code == 200 and "[DONE]" in r.text, r.text
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)
