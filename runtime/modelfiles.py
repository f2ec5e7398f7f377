"""Files of a Hugging Face model directory: config.json and the tokenizer.

Shared by the runtime (which tokenises evaluation rows for every back-end), the exporters and
training. transformers is imported only inside ``load_tokenizer``; no torch is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgeft.core.errors import EdgeftError, one_line


def load_tokenizer(model: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise EdgeftError(f"{model}: cannot load tokenizer: {one_line(e)}") from None
    _check_template_names(tok, model)
    if tok.pad_token_id is None:
        # Padding is masked out of attention and loss; any id works, EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def _check_template_names(tok: Any, model: str) -> None:
    """Refuse named chat templates whose name holds a path.

    ``save_pretrained`` writes each named template to ``additional_chat_templates/NAME.jinja``,
    so a name such as ``../../x`` or ``/x`` in a tokenizer config would be written outside the
    output directory of every command that saves the tokenizer (train, merge, export onnx).
    """
    names = tok.chat_template if isinstance(tok.chat_template, dict) else {}
    for name in names:
        if not name or name in {".", ".."} or any(c in name for c in "/\\\0"):
            raise EdgeftError(f"{model}: tokenizer_config.json: chat_template name {name!r} holds a path; "
                              "it would be written outside the output directory (rename the template)")


def tokenizer_model_type(model_dir: str | os.PathLike) -> str | None:
    """The tokenizer algorithm ("BPE", "Unigram", "WordPiece") read from tokenizer.json.

    Class names lie: a GGUF-derived BPE tokenizer is saved as ``LlamaTokenizer``.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["model"]["type"]
    except (ValueError, KeyError, TypeError):
        return None


def read_model_config(model: str) -> dict[str, Any]:
    """config.json of a local model directory as a dict (empty for Hub ids not cached)."""
    path = Path(model) / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise EdgeftError(f"{path}: invalid JSON ({e})") from None
    return {}
