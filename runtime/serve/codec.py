"""Text in and out of token ids for the server: the artifact's chat template, tokenizer and stop tokens.

Two codecs, neither of which imports torch or transformers: ``HfFilesCodec`` reads a model
directory's ``tokenizer.json`` (the ``tokenizers`` library) and chat template; ``GgufCodec`` uses
llama.cpp's own vocabulary and the template stored in the GGUF. Chat templates are rendered the
way transformers renders them (sandboxed Jinja, trim_blocks, lstrip_blocks, the special tokens as
variables), so a served prompt has the token ids ``apply_chat_template`` gives.
"""

from __future__ import annotations

import codecs
import ctypes
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from edgeft.core.errors import EdgeftError, one_line
from edgeft.core.rows import FALLBACK_CHAT_TEMPLATE
from runtime.backends.llama_backend import vocab_tokenize


class TemplateError(ValueError):
    """The chat template refused the messages (it raised, or they do not fit its roles)."""


def render_chat(template: str, messages: list[dict[str, Any]], special: dict[str, str]) -> str:
    """The prompt text of ``messages`` with the generation prompt, as transformers renders it."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except TemplateError:
        raise
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template failed on these messages ({one_line(e)})") from None


class TextStream:
    """Incremental detokenisation: feed token ids, get the new text (held back mid UTF-8 character)."""

    def push(self, token: int) -> str:
        raise NotImplementedError


class Codec:
    """What the server needs of a tokenizer; ``stop_ids`` end a generation (end of turn, EOS)."""

    template: str
    special: dict[str, str]
    stop_ids: frozenset[int]

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        raise NotImplementedError

    def stream(self) -> TextStream:
        raise NotImplementedError

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the chat prompt (the template carries BOS itself, as transformers assumes)."""
        return self.encode(render_chat(self.template, messages, self.special), add_special=False)


# ---------------------------------------------------------------------------------------------
# A Hugging Face model directory (ONNX export, merged model, adapter)


class _TokenizersStream(TextStream):
    def __init__(self, tokenizer: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer, self.decoder = tokenizer, DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        return self.decoder.step(self.tokenizer, token) or ""


class HfFilesCodec(Codec):
    """tokenizer.json, tokenizer_config.json, chat_template.jinja and the EOS ids of a model directory."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise EdgeftError(f"{directory}: no tokenizer.json (the server reads the fast tokenizer file)")
        self.tokenizer = Tokenizer.from_file(str(path))
        config = _read_json(directory / "tokenizer_config.json")
        self.special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.special = {k: v for k, v in self.special.items() if v}
        self.template = _hf_template(directory, config) or FALLBACK_CHAT_TEMPLATE
        stop = set()
        for source in (_read_json(directory / "generation_config.json"), _read_json(directory / "config.json")):
            eos = source.get("eos_token_id")
            stop.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        for name in ("eos_token", "eot_token"):
            token_id = self.tokenizer.token_to_id(self.special.get(name, "")) if self.special.get(name) else None
            if token_id is not None:
                stop.add(token_id)
        self.stop_ids = frozenset(stop)

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special).ids)

    def stream(self) -> TextStream:
        return _TokenizersStream(self.tokenizer)


def _hf_template(directory: Path, config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken written out: {"content": ..., ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise EdgeftError(f"{path}: unreadable ({e})") from None
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------
# A GGUF file: llama.cpp's vocabulary


class _PieceStream(TextStream):
    def __init__(self, codec: "GgufCodec") -> None:
        self.codec, self.utf8 = codec, codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.utf8.decode(self.codec.piece(token, special=False))


class GgufCodec(Codec):
    """llama.cpp's tokenizer and detokeniser of a loaded GGUF model (``GgufBackend``), and its template."""

    def __init__(self, backend: Any) -> None:
        self.lib = lib = backend.lib
        self.vocab = lib.llama_model_get_vocab(backend.model)
        template = lib.llama_model_chat_template(backend.model, None)
        self.template = template.decode("utf-8") if template else FALLBACK_CHAT_TEMPLATE
        bos, eos = lib.llama_vocab_bos(self.vocab), lib.llama_vocab_eos(self.vocab)
        self.special = {k: self.piece(t, special=True).decode("utf-8", "replace")
                        for k, t in (("bos_token", bos), ("eos_token", eos)) if t >= 0}
        n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.stop_ids = frozenset(t for t in range(n_vocab) if lib.llama_vocab_is_eog(self.vocab, t))

    def piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        return vocab_tokenize(self.lib, self.vocab, text, add_special=add_special)

    def stream(self) -> TextStream:
        return _PieceStream(self)


def open_codec(kind: str, path: Path, backend: Any, tokenizer_dirs: Sequence[Path]) -> Codec:
    """The codec of an artifact: llama.cpp's for a GGUF, else the first directory holding tokenizer.json."""
    if kind == "gguf":
        return GgufCodec(backend)
    for directory in tokenizer_dirs:
        if (directory / "tokenizer.json").is_file():
            return HfFilesCodec(directory)
    raise EdgeftError(f"{path}: no tokenizer.json here or in its base model; the server needs the fast tokenizer")
