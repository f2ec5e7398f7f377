"""``edgeft serve`` settings (typed, validated before any model is loaded) and ``--adapter NAME=PATH`` parsing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.core.errors import ConfigError

API_KEY_ENV = "EDGEFT_API_KEY"


@dataclass
class ServeConfig:
    """Every knob of the server; the CLI flags have the same names."""

    artifact: Path
    host: str = "127.0.0.1"  # loopback only unless the user says otherwise
    port: int = 8000
    slots: int = 1  # requests decoded at the same time (each its own KV cache, weights shared)
    queue: int = 16  # requests allowed to wait for a slot; one more gets 429
    timeout: float = 120.0  # seconds a request may take, waiting for a slot included
    threads: int | None = None  # engine threads per slot (default: the cores divided among the slots)
    ctx: int = 2048  # context per slot (prompt + answer), capped at the model's trained context
    max_tokens: int = 256  # answer length when a request names none
    max_prompt_tokens: int | None = None  # default: the context less one answer token
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    allow_unverified: bool = False
    adapters: dict[str, Path] = field(default_factory=dict)  # .lora.gguf files (GGUF) or PEFT directories (PyTorch)
    name: str | None = None  # the model id clients send (default: the artifact's file or directory name)

    def __post_init__(self) -> None:
        self.api_key = self.api_key or os.environ.get(API_KEY_ENV) or None

    def threads_per_slot(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.slots)

    def validate(self) -> None:
        """Every problem at once, as one ``ConfigError`` naming the flags."""
        problems = []
        if not self.artifact.exists():
            problems.append(f"ARTIFACT {self.artifact}: not found")
        for flag, value, low in (("--slots", self.slots, 1), ("--queue", self.queue, 0), ("--ctx", self.ctx, 64),
                                 ("--max-tokens", self.max_tokens, 1), ("--max-body-bytes", self.max_body_bytes, 256),
                                 ("--port", self.port, 0)):
            if value < low:
                problems.append(f"{flag} {value}: must be at least {low}")
        if self.timeout <= 0:
            problems.append(f"--timeout {self.timeout}: must be positive")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            problems.append(f"--max-prompt-tokens {self.max_prompt_tokens}: must be at least 1")
        for name, path in self.adapters.items():
            if not path.exists():
                problems.append(f"--adapter {name}={path}: not found")
        if problems:
            raise ConfigError("; ".join(problems))


def parse_adapters(values: tuple[str, ...] | list[str]) -> dict[str, Path]:
    """``("sentiment=a.lora.gguf", ...)`` or ``("sentiment=runs/sentiment", ...)`` as {name: path}; names
    must be distinct and non-empty."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapter {value!r}: expected NAME=FILE.lora.gguf (GGUF base) or NAME=ADAPTER_DIR "
                              "(PyTorch base)")
        if name in out:
            raise ConfigError(f"--adapter {name}: given twice")
        out[name.strip()] = Path(path.strip()).expanduser()
    return out
