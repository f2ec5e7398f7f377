"""What the server agrees to load: an artifact its verification record vouches for, and task adapters that
fit the served base (verified GGUF LoRA files on a GGUF base; PEFT adapter directories trained from the
served model directory on a PyTorch base). Every check reads small files only, before any weights load.
"""

from __future__ import annotations

from pathlib import Path

from edgeft.core.errors import EdgeftError
from edgeft.core.records import files_changed, read_record, record_path
from runtime.artifacts import GGUF, MERGED, UNMERGED, adapter_config, base_model_of, detect_kind
from runtime.modelfiles import read_model_config

# config.json keys that decide the shapes a LoRA adapter's matrices must have.
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size")


def unverified_reason(path: Path) -> str | None:
    """Why ``path``'s verification record does not vouch for it (missing, failed, stale); None when it does."""
    try:
        record = read_record(path)
    except EdgeftError as e:
        return e.format_message()
    if record["status"] != "passed":
        return f"{record_path(path).name} says it failed verification"
    return files_changed(path, record)


def require_verified(path: Path, allow_unverified: bool) -> None:
    """Refuse an artifact its record does not vouch for, unless the user said otherwise."""
    reason = unverified_reason(path)
    if reason and not allow_unverified:
        raise EdgeftError(f"{path}: not serving it: {reason} (pass --allow-unverified to serve it anyway)")


def check_served(artifact: Path, kind: str, adapters: dict[str, Path], allow_unverified: bool) -> None:
    """The artifact and its task adapters, checked; one ``EdgeftError`` line for the first problem."""
    if adapters and kind not in (GGUF, MERGED):
        raise EdgeftError(f"--adapter: {artifact} is an artifact of kind {kind}; task adapters are served on a "
                          "GGUF base (`edgeft export gguf-lora`) or on the PyTorch model directory they were "
                          "trained from")
    for name, path in adapters.items():
        if kind == GGUF:
            check_gguf_adapter(name, path, allow_unverified)
        else:
            check_trained_on(artifact, name, path)
    if kind == UNMERGED:  # an adapter directory is the reference itself: no record to check
        return
    if kind == MERGED and adapters and not record_path(artifact).is_file() and \
            all(same_model(base_model_of(path), artifact) for path in adapters.values()):
        return  # the model the adapters were trained from is their reference: nothing was exported
    require_verified(artifact, allow_unverified)


def check_gguf_adapter(name: str, path: Path, allow_unverified: bool) -> None:
    """A GGUF base takes llama.cpp adapter files, with their records."""
    if detect_kind(path) != GGUF:
        raise EdgeftError(f"--adapter {name}={path}: not a GGUF adapter file; on a GGUF base, task adapters are "
                          "exported with `edgeft export gguf-lora`")
    require_verified(path, allow_unverified)


def check_trained_on(base: Path, name: str, adapter: Path) -> None:
    """A PyTorch base takes PEFT LoRA directories trained from it: the base the adapter records is this
    directory, or a model of the same architecture and shapes (a copy, a merged model of the base)."""
    if detect_kind(adapter) != UNMERGED:
        raise EdgeftError(f"--adapter {name}={adapter}: not a PEFT adapter directory (adapter_config.json); "
                          "on a PyTorch base, task adapters are `edgeft train` output directories")
    adapter_config(adapter)  # LoRA only
    recorded = base_model_of(adapter)
    if same_model(recorded, base):
        return
    ours, theirs = read_model_config(str(base)), read_model_config(recorded)
    if not theirs:
        raise EdgeftError(f"--adapter {name}={adapter}: trained on {recorded}, which is not here to compare "
                          f"with {base}; serve the model it was trained on")
    differ = [f"{k} {theirs.get(k)} vs {ours.get(k)}" for k in SHAPE_KEYS if theirs.get(k) != ours.get(k)]
    if differ:
        raise EdgeftError(f"--adapter {name}={adapter}: trained on {recorded}, not on {base} "
                          f"({', '.join(differ[:3])})")


def same_model(recorded: str, directory: Path) -> bool:
    """Whether the base an adapter records is ``directory`` itself."""
    path = Path(recorded).expanduser()
    return path.is_dir() and path.resolve() == directory.resolve()
