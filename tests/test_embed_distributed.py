"""`embed` under torchrun with 2 processes (gloo, CPU) writes the same store as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image_folder
from eclipse_prior.data.embed import embed
from eclipse_prior.data.store import EmbeddingStore

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_embed_equals_single_process(tmp_path, tiny_clip_dir):
    folder = write_image_folder(
        tmp_path / "imgs", captions=[f"a red square {i}" for i in range(14)] + ["", "x"]
    )
    (folder / "img_015.png").write_bytes(b"broken")
    args = ["--clip", str(tiny_clip_dir), "--shard-size", "3", "--batch-size", "2", "--num-workers", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "eclipse_prior",
        "embed",
        str(folder),
        "--out",
        str(tmp_path / "two"),
        "--no-progress",
        *args,
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    one = EmbeddingStore(
        embed(
            folder,
            str(tiny_clip_dir),
            tmp_path / "one",
            shard_size=3,
            batch_size=2,
            num_workers=1,
            progress=False,
        )
    )
    two = EmbeddingStore(tmp_path / "two")
    two.validate()
    assert two.manifest["world_size"] == 2 and one.manifest["world_size"] == 1
    assert len(two) == len(one) == 14 and len(two.manifest["shards"]) == 6
    assert two.manifest["summary"] == one.manifest["summary"]
    assert two.manifest["summary"]["skipped"] == {"empty_caption": 1, "unreadable_image": 1}
    for a, b in zip(one.manifest["shards"], two.manifest["shards"], strict=True):
        assert a["rows"] == b["rows"]
        for f in ("meta.jsonl", "row_hash.npy", "caption_ids.npy"):
            assert a["sha256"][f] == b["sha256"][f]
    # torchrun runs each process with 1 thread: allow for float summation order in the vectors
    x, y = one.get_batch(np.arange(14)), two.get_batch(np.arange(14))
    for key in x:
        np.testing.assert_allclose(x[key], y[key], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(one.split_indices("val"), two.split_indices("val"))
