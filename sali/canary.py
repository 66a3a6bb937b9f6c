"""The generation canary of `sali doctor`: a tiny GGUF written here, and a short generation.

``python -m sali.canary [MODEL]`` loads MODEL (default: a tiny random Llama GGUF written by
:func:`write_tiny_gguf` into a temporary folder), evaluates a prompt of 64 tokens in one batch
(the path where a miscompiled llama.cpp build dies, e.g. of SIGILL in its AMX kernels) and
generates 8 tokens greedily. It prints one ``ok`` line and exits 0, or dies: `sali doctor` runs
it in a subprocess and reads the exit status, so a crash there never takes doctor down.

The tiny model: byte-level BPE vocabulary of 258 tokens, embedding 256, 2 layers, 4 heads,
feed-forward 512; matrices in Q8_0 (rows of 256 values, whole 32-blocks), so quantised matrix
kernels run as they do for real models. Random weights: the text it writes is noise.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_EMBD, N_LAYER, N_HEAD, N_FF, N_CTX = 256, 2, 4, 512, 256
PROMPT_TOKENS, NEW_TOKENS = 64, 8


def _byte_tokens() -> list[str]:
    """The 256 byte-level BPE token strings (printable bytes as themselves, others shifted to
    U+0100 upwards), in byte order."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiny_gguf(path: str | Path, seed: int = 0, arch: str = "llama") -> Path:
    """Write the canary model (see module docstring) to `path` with the ``gguf`` writer; `arch`
    names another architecture in its metadata (tests of refused models)."""
    import gguf

    from sali.atomic import atomic_path

    rng = np.random.default_rng(seed)
    tokens = _byte_tokens()
    space_t = tokens[ord(" ")] + "t"
    tokens += [space_t, "<|endoftext|>"]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    q8 = gguf.GGMLQuantizationType.Q8_0

    def matrix(rows: int, cols: int) -> np.ndarray:
        return gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), q8)

    path = Path(path)
    with atomic_path(path, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name("sali-canary")
        writer.add_context_length(N_CTX)
        writer.add_embedding_length(N_EMBD)
        writer.add_block_count(N_LAYER)
        writer.add_feed_forward_length(N_FF)
        writer.add_head_count(N_HEAD)
        writer.add_head_count_kv(N_HEAD)
        writer.add_rope_dimension_count(N_EMBD // N_HEAD)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(len(tokens))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([f"{tokens[ord(' ')]} t"])
        writer.add_bos_token_id(len(tokens) - 1)
        writer.add_eos_token_id(len(tokens) - 1)
        writer.add_add_bos_token(False)
        writer.add_tensor("token_embd.weight", matrix(len(tokens), N_EMBD), raw_dtype=q8)
        writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for layer in range(N_LAYER):
            blk = f"blk.{layer}"
            writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                writer.add_tensor(f"{blk}.{name}.weight", matrix(N_EMBD, N_EMBD), raw_dtype=q8)
            writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
            writer.add_tensor(f"{blk}.ffn_gate.weight", matrix(N_FF, N_EMBD), raw_dtype=q8)
            writer.add_tensor(f"{blk}.ffn_up.weight", matrix(N_FF, N_EMBD), raw_dtype=q8)
            writer.add_tensor(f"{blk}.ffn_down.weight", matrix(N_EMBD, N_FF), raw_dtype=q8)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def run(model: Path | None) -> str:
    """Load `model` (or the tiny one), evaluate a 64-token prompt in one batch, generate 8 tokens."""
    from sali.runtime import Model, Sampling

    with tempfile.TemporaryDirectory(prefix="sali-canary-") as folder:
        path = model or write_tiny_gguf(Path(folder) / "canary.gguf")
        start = time.perf_counter()
        llm = Model(path, n_threads=None, n_ctx=max(N_CTX, PROMPT_TOKENS + NEW_TOKENS + 8))
        try:
            prompt = (llm.tokenize("The quick brown fox jumps over the lazy dog. " * 16) * 8)[:PROMPT_TOKENS]
            done = llm.complete(prompt, Sampling(max_tokens=NEW_TOKENS, ignore_eos=True))
        finally:
            llm.close()
        return f"ok: {path.name if model else 'tiny canary model'}, {len(prompt)} prompt tokens, {len(done.tokens)} generated in {time.perf_counter() - start:.2f} s"


def main(argv: list[str]) -> None:
    from sali.errors import SaliError

    try:
        print(run(Path(argv[0]) if argv else None), flush=True)
    except SaliError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
