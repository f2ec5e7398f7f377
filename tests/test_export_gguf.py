"""GGUF export: tiny real models (built from a config, real SmolLM2 BPE tokenizer) through llama.cpp.

Asserted numbers: f16 GGUF top-1 agreement with PyTorch >= 99 %, token ids identical to the
HF tokenizer, the exact set of files written, the per-tensor types the quantizer was asked
for, and one-line errors before any file is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import make_tiny_llama

pytest.importorskip("llama_cpp")

from edgeft.core.errors import EdgeftError  # noqa: E402
from export.gguf import export_gguf, gguf_tensor_types, tables as T  # noqa: E402


def check(record, name: str):
    return next(c for c in record.checks if c.name == name)


def files_in(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


@pytest.fixture(scope="module")
def qwen2_untied_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    # One model covers both: q/k/v biases and no permutation (qwen2), and a separate lm_head.
    return make_tiny_llama(tmp_path_factory.mktemp("qwen2"), smol_tokenizer_dir, arch="qwen2", tie=False, seed=1)


@pytest.fixture(scope="module")
def f16_export(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("f16") / "tiny.gguf"
    return out, export_gguf(tiny_llama_dir, out, qtype="f16")


def test_f16_agrees_with_pytorch_and_tokenizer(f16_export):
    out, rec = f16_export
    assert rec.status == "passed", rec.summary()
    assert check(rec, "top1_agreement").value >= 0.99
    assert check(rec, "mean_kl").value <= 2e-3
    assert check(rec, "tokenizer_mismatches").value == 0
    assert rec.metrics["tokenization"]["samples"] >= 10
    assert rec.metrics["logits"]["positions"] >= 500
    assert rec.metrics["tokenizer"]["model"] == "gpt2" and rec.metrics["tokenizer"]["pre"] == "smollm"
    # tied embeddings: no output.weight; 2-D weights f16, norms f32
    types = gguf_tensor_types(out)
    assert "output.weight" not in types
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_q.weight"] == "F16"
    assert types["output_norm.weight"] == "F32"


def test_exact_file_set_record_and_modelfile(f16_export):
    out, rec = f16_export
    assert files_in(out.parent) == {"tiny.gguf", "tiny.gguf.verify.json", "tiny.Modelfile"}
    on_disk = json.loads((out.parent / "tiny.gguf.verify.json").read_text())
    assert on_disk["status"] == "passed" and on_disk["kind"] == "gguf"
    assert on_disk["metrics"]["file_size_bytes"] == out.stat().st_size
    mf = (out.parent / "tiny.Modelfile").read_text()
    assert "FROM ./tiny.gguf\n" in mf
    assert "<|im_start|>{{ .Role }}" in mf  # ChatML turned into an Ollama template
    assert 'PARAMETER stop "<|im_end|>"' in mf
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in mf


def test_existing_output_refused_without_overwrite(f16_export, tiny_llama_dir):
    out, _ = f16_export
    with pytest.raises(EdgeftError, match="--output .* already exists; pass --overwrite"):
        export_gguf(tiny_llama_dir, out, qtype="f16")


def test_qwen2_untied_loads_and_agrees(tmp_path, qwen2_untied_dir):
    out = tmp_path / "q.gguf"
    rec = export_gguf(qwen2_untied_dir, out, qtype="f16")
    assert rec.status == "passed", rec.summary()
    assert check(rec, "top1_agreement").value >= 0.99
    types = gguf_tensor_types(out)
    assert types["output.weight"] == "F16"  # untied: its own output projection
    assert types["blk.1.attn_k.bias"] == "F32"
    assert rec.metrics["architecture"] == {"hf": "Qwen2ForCausalLM", "gguf": "qwen2", "tied_embeddings": False}


@pytest.mark.parametrize("qtype, body_types", [("q8_0", {"Q8_0"}), ("q4_k_m", {"Q4_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0"})])
def test_quantize_path_writes_record(tmp_path, tiny_llama_dir, qtype, body_types):
    out = tmp_path / f"tiny-{qtype}.gguf"
    rec = export_gguf(tiny_llama_dir, out, qtype=qtype)
    assert files_in(tmp_path) == {out.name, out.name + ".verify.json", out.stem + ".Modelfile"}  # no intermediate left
    types = gguf_tensor_types(out)
    spec = T.QUANT_TYPES[qtype]
    # the tensors we keep above the type (tables.QUANT_TYPES), llama.cpp's mix for the rest
    for i in (0, 1):
        assert types[f"blk.{i}.attn_v.weight"] == "F16"
        assert types[f"blk.{i}.ffn_down.weight"] == "Q8_0"
        assert {types[f"blk.{i}.{t}.weight"] for t in ("attn_q", "ffn_up")} <= body_types
    assert types["token_embd.weight"] == "Q8_0"  # llama.cpp's choice for a tied embedding
    assert check(rec, "llama_cpp_loads").passed and check(rec, "tokenizer_mismatches").value == 0
    # A random 64-wide model is far more fragile than a trained one; the figure is recorded and
    # judged against the type's bar, whatever it is.
    top1 = check(rec, "top1_agreement")
    assert 0.3 < top1.value <= 1.0 and top1.threshold == spec.min_top1
    assert json.loads((tmp_path / (out.name + ".verify.json")).read_text())["status"] == rec.status


def test_tensor_types_override_the_mix(tmp_path, tiny_llama_dir):
    out = tmp_path / "tiny-q8_0.gguf"
    opts = T.QuantOptions(tensor_types=(T.parse_tensor_type("attn_q=f16"), T.parse_tensor_type(r"blk\.1\.ffn_up=bf16")))
    rec = export_gguf(tiny_llama_dir, out, qtype="q8_0", quant_options=opts)
    types = gguf_tensor_types(out)
    assert {types[f"blk.{i}.attn_q.weight"] for i in (0, 1)} == {"F16"}
    assert (types["blk.0.ffn_up.weight"], types["blk.1.ffn_up.weight"]) == ("Q8_0", "BF16")
    assert types["blk.0.attn_v.weight"] == "F16" and types["blk.0.attn_k.weight"] == "Q8_0"  # the table's keep stays
    assert rec.metrics["quantization"]["tensor_types"] == ["attn_q=f16", r"blk\.1\.ffn_up=bf16"]


@pytest.mark.parametrize("qtype, value, message", [
    ("q8_0", "attn_qq=f16", r"--tensor-type attn_qq=f16: matches no tensor of this model \(names look like blk\."),
    ("f16", "attn_q=q8_0", "--type f16 stores every tensor as it is"),
])
def test_tensor_types_refused_before_writing(tmp_path, tiny_llama_dir, qtype, value, message):
    out = tmp_path / "o" / "m.gguf"
    with pytest.raises(EdgeftError, match=message):
        export_gguf(tiny_llama_dir, out, qtype=qtype, quant_options=T.QuantOptions(tensor_types=(T.parse_tensor_type(value),)))
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("value, message", [("ffn_up", "expected NAME=TYPE"), ("ffn_up=q9", "unknown type 'q9'"),
                                            ("(=f16", "is not a regular expression")])
def test_bad_tensor_type_flag_is_one_line(tmp_path, tiny_llama_dir, value, message):
    from click.testing import CliRunner

    from edgeft.cli import cli

    r = CliRunner().invoke(cli, ["export", "gguf", "--model", str(tiny_llama_dir), "--output", str(tmp_path / "m.gguf"),
                                 "--type", "q8_0", "--tensor-type", value])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--tensor-type" in lines[0] and message in lines[0], r.output
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},  # becomes a rope_freqs tensor
    {"rope_type": "linear", "factor": 4.0},  # becomes metadata
])
def test_rope_scaling_carried_over(tmp_path, tiny_llama_dir, rope):
    model = _copy_model(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "rope_scaling": rope}))
    out = tmp_path / "o" / "m.gguf"
    rec = export_gguf(model, out, qtype="f32")
    # the samples run past 32 positions, where llama3 scaling changes the low frequencies
    assert check(rec, "top1_agreement").value >= 0.99, rec.summary()
    assert ("rope_freqs.weight" in gguf_tensor_types(out)) == (rope["rope_type"] == "llama3")


def test_unsupported_rope_scaling_refused(tmp_path, tiny_llama_dir):
    model = _copy_model(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}))
    with pytest.raises(EdgeftError, match="rope_scaling type 'longrope'"):
        export_gguf(model, tmp_path / "o" / "m.gguf")


def test_sentencepiece_tokenizer(tmp_path):
    tok_dir = _sentencepiece_tokenizer(tmp_path / "spm_tok")
    model = make_tiny_llama(tmp_path / "spm_model", tok_dir)
    rec = export_gguf(model, tmp_path / "out" / "spm.gguf", qtype="f16")
    assert rec.metrics["tokenizer"]["model"] == "llama"  # SentencePiece-style, from tokenizer.json
    assert rec.metrics["tokenizer"]["add_bos"] is True
    assert check(rec, "tokenizer_mismatches").value == 0, rec.metrics["tokenization"]
    assert check(rec, "top1_agreement").value >= 0.99


def _sentencepiece_tokenizer(out: Path) -> Path:
    """A Llama-2-style fast tokenizer: BPE with byte fallback, '▁' word marks, BOS prepended."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import LlamaTokenizerFast

    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?",
              "Paris is the capital of France.", "def f(x):\n    return x * 2\n"] * 20
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer.normalizer = norm
    trainer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trainer.to_str())["model"]["merges"]]
    # Llama layout: specials, then the 256 byte tokens, then the learned pieces.
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                       add_bos_token=True, legacy=True).save_pretrained(out)
    return out


# ---- refusals: one line, before any work --------------------------------------------------


def _tiny_gpt2(out: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tok))).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_unsupported_architecture_refused_through_cli(tmp_path, smol_tokenizer_dir):
    from click.testing import CliRunner

    from edgeft.cli import cli

    model = _tiny_gpt2(tmp_path / "gpt2", smol_tokenizer_dir)
    out = tmp_path / "out" / "g.gguf"
    r = CliRunner().invoke(cli, ["export", "gguf", "--model", str(model), "--output", str(out)])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert lines[0].startswith("edgeft: error: ")
    assert "GPT2LMHeadModel" in lines[0] and "LlamaForCausalLM" in lines[0] and "Qwen2ForCausalLM" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors(tmp_path, tiny_llama_dir):
    model = _copy_model(tiny_llama_dir, tmp_path / "m")
    st = model / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(EdgeftError, match=r"model.safetensors: unreadable safetensors file"):
        export_gguf(model, tmp_path / "o" / "m.gguf")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("remove, message", [("tokenizer.json", "no tokenizer.json"), ("config.json", "no config.json")])
def test_missing_files(tmp_path, tiny_llama_dir, remove, message):
    model = _copy_model(tiny_llama_dir, tmp_path / "m")
    (model / remove).unlink()
    with pytest.raises(EdgeftError, match=message) as e:
        export_gguf(model, tmp_path / "o" / "m.gguf")
    assert "\n" not in e.value.format_message()
    assert not (tmp_path / "o").exists()


# ---- pure tables ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, expected", [
    (dict(split_regexes=[T.LLAMA3_REGEX]), "llama-bpe"),
    (dict(split_regexes=[T.QWEN2_REGEX]), "qwen2"),
    (dict(split_regexes=[], individual_digits=True), "smollm"),
    (dict(split_regexes=[]), "smollm"),  # no multi-digit tokens, no space clean-up: SmolLM2 from a GGUF
    (dict(split_regexes=[], multi_digit_tokens=True), "gpt-2"),
    (dict(split_regexes=[r"\p{N}{1,3}|\s+"]), "llama-bpe"),  # unknown regex: nearest rule
])
def test_pick_bpe_pre(kwargs, expected):
    args = dict(byte_level_regex=True, individual_digits=False, multi_digit_tokens=False, clean_up_spaces=False)
    assert T.pick_bpe_pre(**{**args, **kwargs})[0] == expected
