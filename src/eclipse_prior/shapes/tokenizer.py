"""Word-level tokenizer for the shapes-world CLIP (the `tokenizers` library, wrapped for AutoTokenizer).

Every word of the caption grammar is in the vocabulary; anything else maps to ``<unk>``. Special tokens follow
CLIP's names: ``<pad>`` (id 0), ``<|startoftext|>`` (bos, id 1), ``<unk>`` (id 2), ``<|endoftext|>`` (eos, id 3).
The eos id is not 2, so transformers' CLIP text model pools at the first eos token (not the legacy argmax).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

from eclipse_prior.shapes.captions import (
    CONJUNCTIONS,
    LARGER_WORDS,
    PREFIXES,
    RELATION_WORDS,
    SIZE_WORDS,
    SMALLER_WORDS,
    TEXTURE_WORDS,
)
from eclipse_prior.shapes.world import COLOURS, SHAPES

PAD, BOS, UNK, EOS = "<pad>", "<|startoftext|>", "<unk>", "<|endoftext|>"
#: Text context length of the shapes CLIP (the longest grammar caption is 17 words + bos + eos).
MAX_LENGTH = 24


def grammar_words() -> list[str]:
    """Every word the caption grammar can produce, in a fixed order."""
    phrases = [*PREFIXES, "a an one", *COLOURS, *SHAPES, *CONJUNCTIONS, *LARGER_WORDS, *SMALLER_WORDS]
    for table in (SIZE_WORDS, TEXTURE_WORDS, RELATION_WORDS):
        phrases += [p for ps in table.values() for p in ps]
    words: list[str] = []
    for phrase in phrases:
        for w in phrase.split():
            if w not in words:
                words.append(w)
    return words


def build_tokenizer(max_length: int = MAX_LENGTH, words: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing whitespace word-level tokenizer adding bos/eos, padding with ``<pad>`` (id 0).

    The vocabulary is the caption grammar's words unless ``words`` is given (tests build tiny CLIPs with it).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab_words = grammar_words() if words is None else list(dict.fromkeys(words))
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, UNK, EOS, *vocab_words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_length,
    )
