"""The Ollama Modelfile written beside a GGUF: its chat template as a Go template, system prompt
and stop strings (chat families in ``tables.CHAT_FORMATS``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from edgeft.core.fsutil import atomic_file
from export.gguf import tables as T
from export.gguf.vocab import VocabPlan

MODELFILE_SUFFIX = ".Modelfile"  # FILE.gguf -> FILE.Modelfile: several exports can share a directory


def modelfile_text(gguf_name: str, vocab: VocabPlan) -> str:
    """An Ollama Modelfile for ``gguf_name`` (in the same directory)."""
    template = vocab.special.chat_template
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    fmt = T.find_chat_format(template)
    eos_id = vocab.special.special_token_ids.get("eos")
    stops = list(fmt.stops) if fmt else []
    if eos_id is not None and vocab.tokens[eos_id] not in stops:
        stops.insert(0, vocab.tokens[eos_id])

    lines = [f"# Ollama Modelfile for {gguf_name}, written by edgeft.", f"# Use: ollama create NAME -f {gguf_name.rsplit('.', 1)[0]}.Modelfile",
             f"FROM ./{gguf_name}"]
    if fmt is not None:
        lines.append(f'TEMPLATE """{fmt.ollama_template}"""')
        system = _default_system_prompt(template or "", fmt)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# No TEMPLATE: Ollama derives one from the GGUF's tokenizer.chat_template.")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    return "\n".join(lines) + "\n"


def _default_system_prompt(template: str, fmt: T.ChatFormat) -> str | None:
    """The system message a ChatML template inserts when the conversation has none."""
    if fmt.name != "chatml":
        return None
    m = re.search(r"<\|im_start\|>system\s*\n(.+?)<\|im_end\|>", template, re.S)
    if not m or any(s in m.group(1) for s in ("{{", "{%", "'", '"')):
        return None
    return m.group(1).strip()


def write_modelfile(gguf_path: Path, vocab: VocabPlan) -> Path:
    """Write ``FILE.Modelfile`` beside ``FILE.gguf`` (atomically) and return its path."""
    path = gguf_path.with_name(gguf_path.stem + MODELFILE_SUFFIX)
    with atomic_file(path) as tmp:
        tmp.write_text(modelfile_text(gguf_path.name, vocab), encoding="utf-8")
    return path
