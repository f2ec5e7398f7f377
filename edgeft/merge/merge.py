"""The merge command's one entry point, ``merge_adapter``: plan, run the model as trained, merge,
write, verify the written model and record the verdict, each a named step below.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from edgeft.core.fsutil import atomic_dir, dir_size, write_json
from edgeft.core.records import Record, write_record
from edgeft.merge.log import MergeLog, quiet_libraries
from edgeft.merge.plan import ADAPTER_WEIGHTS, DTYPES, PROVENANCE_FILE, MergePlan, plan_merge
from edgeft.merge.record import merge_record
from edgeft.merge.verify import Figures, compare, encode_prompts, load_merged, prompt_counts, prompt_logits
from edgeft.merge.weights import AsTrained, Merged, merge_with_policy, nonfinite_tensors, run_as_trained, save_merged
from runtime.modelfiles import load_tokenizer

# Skip the second policy's figures for models this large (another fp32 copy of the base).
OTHER_POLICY_MAX_PARAMS = 1_500_000_000


def merge_adapter(adapter: Path, output: Path, *, base: str | None = None, policy: str = "auto",
                  dtype: str = "fp32", overwrite: bool = False) -> Record:
    """Merge the LoRA adapter in ``adapter`` into its base model and write a HF model to ``output``.

    The merged model is verified against the unmerged model as trained; the verdict is written
    to ``output/edgeft-verify.json`` and returned (a failed verification is a record with status
    "failed", not an exception). User errors raise ``EdgeftError``.
    """
    plan = plan_merge(adapter, output, base=base, policy=policy, dtype=dtype, overwrite=overwrite)
    log = MergeLog()
    with quiet_libraries():
        tok = load_tokenizer(plan.tokenizer_dir)
        prompts = encode_prompts(tok)
        trained = run_as_trained(plan, prompts, log)
        figures = _measure_other_policy(plan, trained, prompts, log)
        merged, bad = _merge_in_output_dtype(plan, trained, prompts, figures, log)
        sizes = {"adapter_bytes": dir_size(plan.adapter / ADAPTER_WEIGHTS)}
        with atomic_dir(plan.output, overwrite=plan.overwrite) as tmp:
            write_json(tmp / PROVENANCE_FILE, plan.provenance())
            if not bad:  # non-finite weights are never written: only the failed record is
                sizes["merged_bytes"] = _write(plan, merged, tok, tmp, log)
                _verify_written(plan, merged, trained, prompts, tmp, figures, log)
            del merged  # the merged model is not needed for the record: free it first
            gc.collect()
            details = {"prompts": prompt_counts(prompts), "quantized_layers": len(trained.quantized), "sizes": sizes}
            record = merge_record(plan, figures, bad, details)
            write_record(tmp, record)
    log.table(plan.policy, figures.policies)
    return record


def _measure_other_policy(plan: MergePlan, trained: AsTrained, prompts: list[Any], log: MergeLog) -> Figures:
    """Figures for the policy not written (adapters trained on a 4-bit base that is not too large)."""
    figures = Figures()
    if not plan.other_policy or (plan.params or 0) > OTHER_POLICY_MAX_PARAMS:
        return figures
    with log.step(f"measuring the {plan.other_policy} policy for comparison"):
        other = merge_with_policy(plan, plan.other_policy, trained, prompts)
        figures.policies[plan.other_policy] = compare(trained.logits, prompt_logits(other.model, prompts))
        if other.bare_logits is not None:
            figures.gap = compare(other.bare_logits, trained.bare_logits)
        del other
        gc.collect()
    return figures


def _merge_in_output_dtype(plan: MergePlan, trained: AsTrained, prompts: list[Any], figures: Figures,
                           log: MergeLog) -> tuple[Merged, list[str]]:
    """Merge with the plan's policy, cast to the output dtype, and name the non-finite tensors."""
    import torch

    with log.step(f"merging with policy {plan.policy}"):
        merged = merge_with_policy(plan, plan.policy, trained, prompts)
        if merged.bare_logits is not None:
            figures.gap = compare(merged.bare_logits, trained.bare_logits)
        merged.model.to(getattr(torch, DTYPES[plan.dtype]))  # in place
        bad = nonfinite_tensors(merged.model.state_dict())
    return merged, bad


def _write(plan: MergePlan, merged: Merged, tok: Any, tmp: Path, log: MergeLog) -> int:
    """Save the merged model and tokenizer into ``tmp``; the bytes of its safetensors files."""
    with log.step(f"writing {plan.output}"):
        save_merged(merged.model, tok, tmp)
    return sum(dir_size(f) for f in tmp.glob("*.safetensors"))


def _verify_written(plan: MergePlan, merged: Merged, trained: AsTrained, prompts: list[Any], tmp: Path,
                    figures: Figures, log: MergeLog) -> None:
    """Read the written model back and compare it with the model as trained and the unmerged adapter."""
    with log.step("verifying the written model against the unmerged model"):
        artifact_logits = prompt_logits(load_merged(tmp), prompts)
    figures.policies[plan.policy] = compare(trained.logits, artifact_logits)
    figures.merge = compare(merged.unmerged_logits, artifact_logits)
