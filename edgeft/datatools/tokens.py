"""Token counts for ``edgeft data``: the tokenizer of a ``--model`` and the length of a row exactly
as training tokenises it (chat template included), so length figures match what ``train`` sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeft.core.rows import Row


def tokenizer_for(model: str | None) -> Any:
    """The tokenizer of ``model`` (a directory with tokenizer files, a model, a .gguf, or the
    embedded default when None)."""
    from runtime.modelfiles import load_tokenizer

    if model is not None and (Path(model) / "tokenizer_config.json").is_file():
        return load_tokenizer(str(model))
    from edgeft.models import resolve_model

    return load_tokenizer(resolve_model(model))


def row_tokens(tok: Any, row: Row) -> int:
    """Tokens of ``row`` as training tokenises it, before truncation."""
    from edgeft.data import tokenize_row

    ids, _ = tokenize_row(tok, row)
    return len(ids)
