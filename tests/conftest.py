"""Shared fixtures: a tiny random transformers CLIP saved to disk, and a small captioned image folder.

Other test files reuse ``tiny_clip_dir`` (a full CLIPModel folder with tokenizer and image processor, loadable by
``eclipse_prior.encoders.clip.load_clip``) and ``image_folder`` (images + ``captions.jsonl``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY_CLIP_WORDS = (
    "a an the of on in and with to left right above below next near big small large tiny photo picture "
    "red green blue yellow orange purple pink black white gray brown cyan "
    "square circle triangle star cross ring heart hexagon cat dog car tree house "
    "striped dotted plain checkered wooden metal one two three"
).split()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a test module: tiny models gain nothing from threads, subprocesses run with
    OMP_NUM_THREADS=1 (equal float results), and on a shared CPU extra threads spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


IMAGE_FOLDER_CAPTIONS = [
    "a red square",
    "a blue circle",
    "a green triangle on the left of a red square",
    "a small yellow star",
    "a red square",  # repeated on purpose: equal captions share a caption id
    "a purple heart next to a big cyan ring",
]


def build_tiny_tokenizer(max_length: int = 77):
    """Word-level tokenizer with CLIP's special tokens (bos <|startoftext|>, eos <|endoftext|> id 3, pad id 0)."""
    from eclipse_prior.shapes.tokenizer import build_tokenizer

    return build_tokenizer(max_length, words=TINY_CLIP_WORDS)


def build_tiny_clip(seed: int = 0, projection_dim: int = 32):
    """A random CLIPModel whose text pooling reads the first eos token (eos id 3, never the legacy id 2)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=projection_dim,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    model = CLIPModel(config).eval()
    return model, tokenizer


def build_tiny_image_processor():
    try:
        from transformers import CLIPImageProcessorPil as Processor  # no torchvision needed
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as Processor
    return Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    model, tokenizer = build_tiny_clip(seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    build_tiny_image_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A full transformers CLIPModel folder (hidden 32, 2 layers, 32 px images, projection 32, 77 tokens)."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


def write_image_folder(root: Path, captions: list[str] = IMAGE_FOLDER_CAPTIONS, size: int = 40) -> Path:
    """Write coloured random PNG/JPEG images and a captions.jsonl ({"file", "caption"} per line)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            name = f"img_{i:03d}.{'png' if i % 2 else 'jpg'}"
            pixels = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name)
            f.write(json.dumps({"file": name, "caption": caption}) + "\n")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A folder of 6 small images with a captions.jsonl (one caption repeated)."""
    return write_image_folder(tmp_path / "images")
