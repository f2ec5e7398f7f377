"""A copy of a safetensors checkpoint with some of its tensors changed.

The weight-folded transforms before quantization (``export/smoothing.py``, ``export/gguf/gptq.py``)
write their result as a standard checkpoint every exporter reads: the same files under the same
names, only the tensors they change replaced.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable


def write_edited_copy(model_dir: Path, dest: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """``model_dir`` copied into ``dest``: every file as it is, except each safetensors shard, which is
    loaded, handed to ``edit`` (it changes the name -> tensor dict in place) and saved under its name."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    for p in model_dir.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copy2(p, dest / p.name)
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(str(shard))
        edit(tensors)
        save_file(tensors, str(dest / shard.name), metadata={"format": "pt"})
