"""The HF -> GGUF converter, checked end to end: real torch, real GGUF files, real llama.cpp.

Every tiny checkpoint is built once per session (seconds), converted, loaded in llama.cpp with
one thread, and compared with transformers running the same weights in float32.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

import tiny_models
from sali.convert.gguf_vocab import detect_pre
from sali.convert.hf_to_gguf import convert_checkpoint, convert_model
from sali.errors import SaliError
from sali.vocab import fingerprint, hf_token_list

# Measured max |HF - llama.cpp| over all positions and all tiny models below (logits have
# std ~1.2): f32 <= 7e-6 with an f32 KV cache (llama.cpp's default f16 cache alone adds up to
# 9e-3, so the f32 test asks for an f32 cache); f16 <= 0.020; q8_0 <= 0.26 (llama.cpp also
# rounds activations to 8 bits in q8_0 matmuls: against HF running the dequantized weights the
# gap is still 0.10). Tolerances are about 3x the measured error; a wrong permutation, rope
# or missing bias moves logits by whole units.
TOLERANCE = {"f32": 1e-3, "f16": 0.06, "q8_0": 0.75}

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# name -> build_llama options; "spm" uses a SentencePiece tokenizer instead of byte-level BPE
KINDS = {
    "llama": dict(seed=0),
    "tied": dict(seed=1, tie_embeddings=True, vocab_size=704),  # 64 padded [PAD] rows
    "mistral": dict(seed=2, arch="MistralForCausalLM"),
    "qwen2": dict(seed=3, arch="Qwen2ForCausalLM", tie_embeddings=True),
    "llama3-rope": dict(seed=4, rope_scaling=LLAMA3_ROPE),
    "spm": dict(seed=5),
}

TEXTS = [
    tiny_models.SAMPLE_TEXT,
    "Numbers such as 12, 345 and 2024 cost $9.99!",
    "Two  spaces,\ttab\nnew line\n\n  indented   end  ",
    "Don't rush; we'll read it. I'M HERE",
    "ünïcödé — “quotes” 東京",
]


class Zoo:
    """Tiny checkpoints, their GGUFs and loaded HF models, each made on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._tokenizers: dict[str, object] = {}
        self._hf: dict[str, torch.nn.Module] = {}

    def tokenizer(self, style: str = "gpt-2"):
        if style not in self._tokenizers:
            self._tokenizers[style] = tiny_models.build_tokenizer(self.root / f"tok-{style}",
                                                                  style=style)
        return self._tokenizers[style]

    def checkpoint(self, kind: str) -> Path:
        folder = self.root / kind
        if not (folder / "config.json").is_file():
            if kind == "spm":
                tiny_models.build_spm_llama(folder, **KINDS[kind])
            elif kind in KINDS:
                tiny_models.build_llama(folder, tokenizer=self.tokenizer(), **KINDS[kind])
            else:  # "pre-<style>": the plain model with another pre-tokenizer
                tiny_models.build_llama(folder, tokenizer=self.tokenizer(kind[4:]))
        return folder

    def gguf(self, kind: str, outtype: str) -> Path:
        path = self.root / f"{kind}-{outtype}.gguf"
        if not path.is_file():
            convert_checkpoint(self.checkpoint(kind), path, outtype)
        return path

    def hf(self, kind: str):
        if kind not in self._hf:
            from transformers import AutoModelForCausalLM

            self._hf[kind] = AutoModelForCausalLM.from_pretrained(
                self.checkpoint(kind), dtype=torch.float32).eval()
        return self._hf[kind]

    def hf_tokenizer(self, kind: str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.checkpoint(kind))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("convert"))


@contextlib.contextmanager
def llama(path: Path, *, f32_cache: bool = False):
    """A llama.cpp model on one thread; an f32 KV cache when asked (see TOLERANCE)."""
    f32 = llama_cpp.GGML_TYPE_F32
    cache = dict(type_k=f32, type_v=f32) if f32_cache else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True,
                          verbose=False, seed=0, **cache)
    try:
        yield llm
    finally:
        llm.close()


def prompt_ids(zoo: Zoo, kind: str, n: int = 20) -> list[int]:
    return zoo.hf_tokenizer(kind).encode(tiny_models.SAMPLE_TEXT)[:n]


def hf_logits(zoo: Zoo, kind: str, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) next-token logits from transformers in float32."""
    with torch.no_grad():
        return zoo.hf(kind)(torch.tensor([ids])).logits[0].numpy()


def llama_logits(path: Path, ids: list[int], *, f32_cache: bool = False) -> np.ndarray:
    with llama(path, f32_cache=f32_cache) as llm:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])


def gguf_tokens(path: Path) -> list[str]:
    return gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"].contents()


@pytest.mark.parametrize("kind", list(KINDS))
def test_f32_logits_match_transformers(zoo, kind):
    ids = prompt_ids(zoo, kind)
    ref = hf_logits(zoo, kind, ids)
    got = llama_logits(zoo.gguf(kind, "f32"), ids, f32_cache=True)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOLERANCE["f32"]


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_quantized_logits_close_to_transformers(zoo, kind, outtype):
    ids = prompt_ids(zoo, kind)
    ref = hf_logits(zoo, kind, ids)
    got = llama_logits(zoo.gguf(kind, outtype), ids)
    tol = TOLERANCE[outtype]
    assert np.abs(got - ref).max() <= tol
    # The top token may only change where HF's own top two are closer than the tolerance.
    rows = np.arange(len(ids))
    flips = got.argmax(1) != ref.argmax(1)
    margin = ref[rows, ref.argmax(1)] - ref[rows, got.argmax(1)]
    assert np.all(margin[flips] < tol)
    assert flips.mean() <= 0.25


@pytest.mark.parametrize("kind", ["llama", "spm", "qwen2"])
def test_greedy_continuation_matches_generate(zoo, kind):
    ids = prompt_ids(zoo, kind, 12)
    model = zoo.hf(kind)
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        out = model.generate(torch.tensor([ids]), attention_mask=mask, max_new_tokens=32,
                             do_sample=False)
    expected = out[0, len(ids):].tolist()
    got = []
    with llama(zoo.gguf(kind, "f32"), f32_cache=True) as llm:
        llm.eval(ids)
        for _ in range(32):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(token)
            llm.eval([token])
    # generate() stops early at eos; the llama.cpp loop just keeps going
    assert len(expected) == 32 or expected[-1] == model.generation_config.eos_token_id
    assert got[: len(expected)] == expected


@pytest.mark.parametrize("kind", ["llama", "tied", "spm"])
def test_vocab_fingerprint_same_in_hf_gguf_and_llama_cpp(zoo, kind):
    tokenizer = zoo.hf_tokenizer(kind)
    vocab_size = zoo.hf(kind).config.vocab_size
    expected = fingerprint(hf_token_list(tokenizer, vocab_size))
    path = zoo.gguf(kind, "q8_0")
    assert fingerprint(gguf_tokens(path)) == expected
    with llama(path) as llm:
        vocab = llm._model.vocab
        texts = [llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8")
                 for i in range(llm.n_vocab())]
    assert fingerprint(texts) == expected
    assert expected.startswith(f"v{vocab_size}-")


@pytest.mark.parametrize("kind", ["llama", "spm", "pre-smollm", "pre-llama-bpe", "pre-qwen2"])
def test_llama_cpp_tokenizes_like_transformers(zoo, kind):
    tokenizer = zoo.hf_tokenizer(kind)
    with llama(zoo.gguf(kind, "q8_0")) as llm:
        for text in TEXTS:
            expected = tokenizer.encode(text)
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == expected, text


def test_detected_pre_tokenizer_names(zoo):
    for style in ["gpt-2", "smollm", "llama-bpe", "qwen2"]:
        spec = json.loads(zoo.tokenizer(style).backend_tokenizer.to_str())
        assert detect_pre(spec) == style
    unknown = {"pre_tokenizer": {"type": "Whitespace"}}
    assert detect_pre(unknown) is None


def test_explicit_pre_overrides_detection(zoo, tmp_path):
    path = convert_checkpoint(zoo.checkpoint("llama"), tmp_path / "m.gguf", "f16", pre="smollm")
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"


def test_metadata_and_tensor_types(zoo):
    reader = gguf.GGUFReader(zoo.gguf("tied", "q8_0"))
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["sali.source"].contents() == "tied"
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.freq_base"].contents() == pytest.approx(100000.0)
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.chat_template"].contents() == tiny_models.CHATML_TEMPLATE
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[1] == gguf.TokenType.CONTROL and types[-1] == gguf.TokenType.UNUSED
    tensors = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_spm_metadata(zoo):
    fields = gguf.GGUFReader(zoo.gguf("spm", "f16")).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert len(fields["tokenizer.ggml.scores"].contents()) == zoo.hf("spm").config.vocab_size
    assert fields["tokenizer.chat_template"].contents() == tiny_models.CHATML_TEMPLATE


@pytest.mark.parametrize("kind", ["llama", "spm"])
def test_convert_model_in_memory(zoo, tmp_path, kind):
    """A model held in memory (e.g. fine-tuned) converts without save_pretrained."""
    model, tokenizer = zoo.hf(kind), zoo.hf_tokenizer(kind)
    path = convert_model(model, tokenizer, tmp_path / "mem.gguf", "f32", name="tuned")
    ids = prompt_ids(zoo, kind)
    got = llama_logits(path, ids, f32_cache=True)
    assert np.abs(got - hf_logits(zoo, kind, ids)).max() <= TOLERANCE["f32"]
    assert gguf.GGUFReader(path).fields["sali.source"].contents() == "tuned"


@pytest.mark.parametrize("layout", ["pytorch_bin", "sharded_safetensors"])
def test_other_checkpoint_layouts(zoo, tmp_path, layout):
    folder = copy_checkpoint(zoo, tmp_path)
    (folder / "model.safetensors").unlink()
    model = zoo.hf("llama")
    if layout == "pytorch_bin":
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, max_shard_size="200KB")
        assert (folder / "model.safetensors.index.json").is_file()
    path = convert_checkpoint(folder, tmp_path / "m.gguf", "f32")
    ids = prompt_ids(zoo, "llama")
    got = llama_logits(path, ids, f32_cache=True)
    assert np.abs(got - hf_logits(zoo, "llama", ids)).max() <= TOLERANCE["f32"]


def test_progress_reports_every_tensor(zoo, tmp_path):
    calls = []
    convert_checkpoint(zoo.checkpoint("llama"), tmp_path / "p.gguf", "f16",
                       progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    assert calls == [(i, total) for i in range(total + 1)]
    assert total == 2 * 9 + 3  # 9 per block + token_embd, output_norm, output


def copy_checkpoint(zoo, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(zoo.checkpoint("llama"), folder)
    return folder


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(SaliError, match="no config.json"):
        convert_checkpoint(tmp_path, tmp_path / "out.gguf")


def test_unsupported_architecture_is_named(zoo, tmp_path):
    folder = copy_checkpoint(zoo, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SaliError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
        convert_checkpoint(folder, tmp_path / "out.gguf")


def test_missing_tokenizer_is_refused(zoo, tmp_path):
    folder = copy_checkpoint(zoo, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(SaliError, match="no tokenizer"):
        convert_checkpoint(folder, tmp_path / "out.gguf")


def test_unknown_outtype_is_refused(zoo, tmp_path):
    with pytest.raises(SaliError, match="q4_0.*f32, f16, q8_0"):
        convert_checkpoint(zoo.checkpoint("llama"), tmp_path / "out.gguf", "q4_0")


def test_failed_conversion_leaves_no_file(zoo, tmp_path):
    """A tokenizer larger than the embedding fails mid-write; nothing is left in the folder."""
    folder = copy_checkpoint(zoo, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 600
    (folder / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        from safetensors.torch import load_file, save_file

        weights = load_file(folder / "model.safetensors")
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            weights[key] = weights[key][:600].contiguous()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(SaliError, match="640 tokens but the model only 600"):
        convert_checkpoint(folder, out / "m.gguf")
    assert list(out.iterdir()) == []
