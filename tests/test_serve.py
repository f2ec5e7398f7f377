"""`edgeft serve` and `edgeft export gguf-lora`: a real server on 127.0.0.1 (a free port), the official
openai client, answers compared with the runtime's own greedy decoding; every server is stopped at
the end of its test (``running_server`` is a context manager)."""

from __future__ import annotations

import json
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


def _expected(gguf: Path, tok, stop_ids, *, adapter: Path | None = None, max_new: int = 16) -> tuple[str, int, int]:
    """(text, prompt tokens, completion tokens) of the runtime's greedy decoding of HI."""
    prompt = list(tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=True))
    backend = GgufBackend(gguf, threads=1, n_ctx=256)
    try:
        if adapter is not None:
            backend.load_adapter("task", adapter)
            backend.use_adapter("task")
        ids = greedy(backend, prompt, max_new, stop_ids=sorted(stop_ids))
    finally:
        backend.close()
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
