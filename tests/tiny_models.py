"""Tiny tokenizers and random Llama-family models, built offline in seconds for the tests.

Everything here is deterministic: the tokenizers are trained on :data:`CORPUS` (a few kB of
plain English written for these tests) and the models are seeded. The tests' conftest calls
these functions; nothing in here is a pytest fixture.
"""

from __future__ import annotations

import itertools
from pathlib import Path

BOS, EOS, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PARAGRAPHS = """\
The river starts high in the hills, where snow melts slowly in the spring.
By the time it reaches the town it is wide and brown, and the children throw stones into it.
Every morning the baker opens her shop before the sun comes up. She bakes bread, small cakes and
a sweet roll with raisins that the old men buy with their coffee.
A good answer is short, clear and honest. If you do not know something, say so, and then explain
how you would find out.
Please write a list of three things you would pack for a long walk in the mountains.
I would take water, a warm jacket and a map. A phone is useful, but the battery can run out.
The committee met on Tuesday to discuss the new library. Most members agreed that the building
should stay open in the evening, so that students can work there after school.
Can you help me with my homework? The question asks why leaves change colour in autumn.
Leaves are green because of chlorophyll. When the days get shorter, the tree stops making it,
and the yellow and orange colours that were hidden underneath become visible.
It's important to check your work. Don't rush; we'll read it again together, and you'll see
that most mistakes are easy to fix once they've been found.
Numbers such as 12, 345 and 2024 appear in text as well, together with prices like $9.99.
The cat sat on the warm window sill and watched the birds in the garden.
Machines that learn from data are only as good as the examples they are given.
"""

_SUBJECTS = ["The teacher", "My friend", "A small dog", "The new student", "Our neighbour",
             "The engineer", "This model", "The old farmer"]
_VERBS = ["wanted to read", "asked about", "carefully explained", "quickly forgot",
          "never understood", "happily shared", "wrote a note about", "talked for hours about"]
_OBJECTS = ["the history of the city.", "a recipe for soup.", "the rules of the game.",
            "the weather in winter.", "a story about the sea.", "the price of the tickets.",
            "how the engine works.", "the answer to the question."]


def corpus_lines() -> list[str]:
    """The training text: the paragraphs above plus 512 templated sentences, one per line."""
    lines = [line for line in _PARAGRAPHS.splitlines() if line]
    for subject, verb, obj in itertools.product(_SUBJECTS, _VERBS, _OBJECTS):
        lines.append(f"{subject} {verb} {obj}")
    return lines


SAMPLE_TEXT = (
    "The baker asked my friend about the weather in winter, and she said: "
    "it's cold, so we'll stay inside."
)


# The split regexes of Llama-3's and Qwen2's tokenizer.json (they differ in how digits group).
_SPLIT_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _pre_tokenizer(style: str):
    """The tokenizer.json pre-tokenizer of a tokenizer family, named as llama.cpp names it."""
    from tokenizers import Regex, pre_tokenizers

    if style == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_REGEX[style]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def build_tokenizer(folder: str | Path, vocab_size: int = 640, style: str = "gpt-2"):
    """Train a byte-level BPE tokenizer (no prefix space) and save it to `folder`.

    Special tokens: ``<|endoftext|>`` (id 0, unk and pad), ``<|im_start|>`` (id 1, bos) and
    ``<|im_end|>`` (id 2, eos), plus a ChatML chat template. Like SmolLM2's tokenizer, it
    adds no bos/eos when encoding. `style` picks the pre-tokenizer: ``gpt-2`` (plain GPT-2
    regex), ``smollm`` (single digits first), ``llama-bpe`` or ``qwen2`` (their split regex).
    Returns the transformers tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = _pre_tokenizer(style)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus_lines(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=PAD, pad_token=PAD
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_spm_tokenizer(folder: str | Path, vocab_size: int = 600):
    """Train a SentencePiece BPE model (Llama-2 style: byte fallback, ``<unk> <s> </s>``).

    Saves ``tokenizer.model`` and the transformers files in `folder`; returns the
    transformers tokenizer (which adds bos, as Llama-2's does).
    """
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # transformers would derive the same BPE tables from tokenizer.model, but only with
    # protobuf installed; this keeps the test dependencies to sentencepiece alone.
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=_spm_merges(sp), legacy=False, add_bos_token=True
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def _spm_merges(sp) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE model: every split of a normal piece into two
    pieces, ranked by the merged piece's score (SentencePiece merges the best-scoring pair)."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, piece_id in vocab.items():
        if not sp.is_unknown(piece_id) and not sp.is_control(piece_id) and not sp.is_byte(piece_id):
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in vocab and right in vocab:
                    merges.append((-sp.get_score(piece_id), vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def _save_model(config, tokenizer, folder: Path, seed: int, arch: str):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).to(torch.float32).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return model


def build_llama(
    folder: str | Path,
    seed: int = 0,
    tokenizer=None,
    *,
    tie_embeddings: bool = False,
    vocab_size: int | None = None,
    rope_scaling: dict | None = None,
    arch: str = "LlamaForCausalLM",
):
    """Save a random ~200k-parameter Llama model (float32 safetensors) plus tokenizer to `folder`.

    hidden 64, 2 layers, 4 heads of 16, 2 kv heads (GQA), ffn 128, context 512. The
    weights use std 0.15 instead of the usual 0.02 so that logits spread over several units and
    greedy choices are not coin flips decided by rounding. `vocab_size` defaults to the
    tokenizer's size; a larger value leaves padded rows (``[PAD{i}]`` tokens). `rope_scaling`
    (e.g. a ``llama3`` dict) goes into the config as is. `arch` may also be
    ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` (which gets q/k/v biases). Returns the model.
    """
    import transformers

    folder = Path(folder)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(folder)
    config_class = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    rope = {"rope_type": "default", "rope_theta": 100000.0}
    if rope_scaling:
        rope.update(rope_scaling)
    config = config_class(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.15,
        tie_word_embeddings=tie_embeddings,
        rope_parameters=rope,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = _save_model(config, tokenizer, folder, seed, arch)
    if arch == "Qwen2ForCausalLM":
        # random biases (the default init leaves them at zero, which would test nothing)
        import torch

        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("proj.bias"):
                    param.normal_(0.0, 0.3)
        model.save_pretrained(folder, safe_serialization=True)
    return model


def build_spm_llama(folder: str | Path, seed: int = 0):
    """A random Llama model as in :func:`build_llama` with a SentencePiece tokenizer."""
    tokenizer = build_spm_tokenizer(folder)
    return build_llama(folder, seed, tokenizer)


def convert(folder: str | Path, out: str | Path, outtype: str = "f16") -> Path:
    """Convert the checkpoint in `folder` to the GGUF file `out` with sali's converter."""
    from sali.convert.hf_to_gguf import convert_checkpoint

    return convert_checkpoint(folder, out, outtype)
