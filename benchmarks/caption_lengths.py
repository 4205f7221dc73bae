"""Mean CLIP token length of real captions: what a compact store keeps per row (README "Sizing a dataset").

A compact store keeps each row's text states only up to its last unmasked token, so its size follows the caption's
token count (start and end tokens included), not the 77-token context. This measures that count on

- the T2I-CompBench val prompts (``--prompts``, one per line) with the real CLIP BPE tokenizer, rebuilt offline from
  ``bpe_simple_vocab_16e6.txt.gz`` (``--bpe``; shipped inside the open_clip_torch wheel:
  ``pip download --no-deps open_clip_torch`` and unzip it; open_clip is not a dependency), and
- shapes-world captions (every category) with the same BPE tokenizer and with the shapes CLIP's own tokenizer.

Usage: ``python benchmarks/caption_lengths.py --bpe PATH/bpe_simple_vocab_16e6.txt.gz --prompts FILE... [--json OUT]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONTEXT = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the BPE works on these characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_bpe_tokenizer(bpe_path: str | Path) -> Any:
    """transformers' CLIPTokenizer built from CLIP's merges file, as OpenAI's simple_tokenizer builds its vocab."""
    from transformers import CLIPTokenizer

    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="clip-bpe-"))
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>")


def token_lengths(tokenizer: Any, captions: Sequence[str], context: int = CONTEXT) -> np.ndarray:
    """Tokens per caption with start/end tokens, capped at the context (what the store's mask marks)."""
    ids = tokenizer(list(captions), truncation=True, max_length=context)["input_ids"]
    return np.array([len(i) for i in ids])


def shapes_captions(per_category: int = 2000, seed: int = 0) -> list[str]:
    from eclipse_prior.shapes.captions import caption
    from eclipse_prior.shapes.world import CATEGORIES, sample_scene

    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng, c), rng) for c in CATEGORIES for _ in range(per_category)]


def summary(lengths: np.ndarray) -> dict[str, float]:
    return {
        "captions": int(len(lengths)),
        "mean_tokens": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "fraction_of_77": float(lengths.mean() / CONTEXT),
    }


def run(bpe: str, prompts: Sequence[str]) -> dict[str, Any]:
    clip = clip_bpe_tokenizer(bpe)
    texts = [line.strip() for p in prompts for line in Path(p).read_text().splitlines() if line.strip()]
    shapes = shapes_captions()
    from eclipse_prior.shapes.tokenizer import build_tokenizer

    return {
        "t2i_compbench_val_clip_bpe": summary(token_lengths(clip, texts)),
        "shapes_clip_bpe": summary(token_lengths(clip, shapes)),
        "shapes_own_tokenizer": summary(token_lengths(build_tokenizer(), shapes)),
        "prompt_files": [Path(p).name for p in prompts],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", required=True, help="bpe_simple_vocab_16e6.txt.gz (from the open_clip_torch wheel)")
    parser.add_argument("--prompts", nargs="+", required=True, help="caption files, one caption per line")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    result = run(args.bpe, args.prompts)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
