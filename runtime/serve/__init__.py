"""``edgeft serve``: an OpenAI-compatible HTTP server over an artifact edgeft wrote (GGUF, ONNX, merged
model, adapter directory), with task adapters (llama.cpp LoRA files on a GGUF, PEFT adapters on a
PyTorch model) switched per request.

Modules, from pure to I/O:

- ``sampling.py``: next-token choice (greedy, temperature, top-p, seed) and stop strings;
- ``schemas.py``: the request bodies (strict pydantic models) and OpenAI-style errors;
- ``responses.py``: answer, stream-chunk and usage bodies;
- ``metrics.py``: Prometheus counters; ``slots.py``: the bounded queue in front of the slots;
- ``codec.py``: chat template, tokenizer and stop tokens (``tokenizers`` or llama.cpp, no torch);
- ``gate.py``: what the server agrees to load (verification records, adapters that fit the base);
- ``engine.py``: the artifact loaded once, its slots, one request's decoding (from the first prompt
  token the slot's cache does not hold);
- ``app.py``: the FastAPI routes; ``config.py``: ``ServeConfig``;
- this module: ``serve`` (the CLI's entry) and ``running_server`` (a server in a thread, for tests
  and benchmarks).

The GGUF and ONNX paths import no torch (``tests/test_serve.py`` checks it in a subprocess).
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

from runtime.serve.config import API_KEY_ENV, ServeConfig, parse_adapters

__all__ = ["API_KEY_ENV", "ServeConfig", "open_server", "parse_adapters", "running_server", "serve"]


def open_server(cfg: ServeConfig) -> tuple[Any, Any]:
    """The loaded engine and a uvicorn server for it (not started)."""
    import uvicorn

    from runtime.serve.app import build_app
    from runtime.serve.engine import Engine

    cfg.validate()
    engine = Engine(cfg.artifact, slots=cfg.slots, threads=cfg.threads_per_slot(), n_ctx=cfg.ctx,
                    allow_unverified=cfg.allow_unverified, adapters=cfg.adapters, name=cfg.name)
    config = uvicorn.Config(build_app(engine, cfg), host=cfg.host, port=cfg.port, log_level="warning",
                            timeout_graceful_shutdown=5)
    return engine, uvicorn.Server(config)


def serve(cfg: ServeConfig, announce: Any = print) -> None:
    """Load the artifact and answer requests until interrupted (Ctrl-C)."""
    engine, server = open_server(cfg)
    try:
        announce(f"serving {engine.model_ids} ({engine.kind}, {cfg.slots} slot(s), context {engine.n_ctx}) "
                 f"on http://{cfg.host}:{cfg.port}/v1" + (" (API key required)" if cfg.api_key else ""))
        server.run()
    finally:
        engine.close()


@contextlib.contextmanager
def running_server(cfg: ServeConfig, startup_s: float = 60.0) -> Iterator[tuple[Any, str]]:
    """A server in a background thread for the block's duration: yields (engine, base URL), then stops it."""
    engine, server = open_server(cfg)
    thread = threading.Thread(target=server.run, name="edgeft-serve", daemon=True)
    thread.start()
    try:
        t_end = time.monotonic() + startup_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError(f"the server did not start on {cfg.host}:{cfg.port}")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield engine, f"http://{cfg.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
