"""Compact (ragged) text states: round trips, the version-1 padded layout, reading only what a run uses, the
prior's output and training losses against the padded layout, and damaged compact shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eclipse_prior.data.store import (
    BufferRing,
    EmbeddingStore,
    StoreWriter,
    store_settings,
    text_lengths,
    token_positions,
    write_store,
)
from eclipse_prior.errors import StoreError
from eclipse_prior.models import EclipsePrior
from eclipse_prior.training import TrainConfig, train
from eclipse_prior.training.trainer import DataOrder, _Batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STATE_KEYS = ("text_states", "text_mask", "text_offsets")


def _rows(lengths: list[int], length: int = 77, width: int = 6, seed: int = 0):
    """Rows whose mask covers `lengths` tokens (with a hole in every third row); states non-zero everywhere."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    mask = np.arange(length)[None, :] < np.array(lengths)[:, None]
    for i in range(0, n, 3):
        if lengths[i] > 2:
            mask[i, 1] = False  # a masked token before the last unmasked one is kept as it is
    arrays = {
        "image_embeds": rng.normal(size=(n, width)).astype(np.float32),
        "text_embeds": rng.normal(size=(n, width)).astype(np.float32),
        "text_states": rng.normal(size=(n, length, width)).astype(np.float32),
        "text_mask": mask,
    }
    meta = [{"id": f"row-{i}", "caption": f"caption {i}"} for i in range(n)]
    return arrays, meta


def _write(path: Path, arrays, meta, layout: str = "ragged", dtype: str = "fp32", shard_size: int = 7):
    return write_store(path, arrays, meta, shard_size=shard_size, clip_id="tiny", clip_revision="0",
                       normalized=False, dtype=dtype, val_fraction=0.25, text_layout=layout)


def _kept(arrays) -> np.ndarray:
    """The states a compact row keeps (zero after the last unmasked token): what every layout reads back."""
    keep = np.arange(arrays["text_mask"].shape[1])[None, :] < text_lengths(arrays["text_mask"])[:, None]
    return arrays["text_states"] * keep[..., None]


@pytest.mark.parametrize("lengths", [[1] * 5, [77] * 4, [1, 77, 13, 2, 40, 77, 8, 1, 25, 0, 3, 60, 19, 77, 5, 9]])
def test_compact_round_trip(tmp_path, lengths):
    arrays, meta = _rows(lengths)
    store = _write(tmp_path / "s", arrays, meta)
    n = len(lengths)
    assert store.text_layout == "ragged" and store.manifest["version"] == 2
    assert store.manifest["text_tokens"] == sum(lengths)  # only the kept tokens are on disk
    store.validate()
    idx = np.array([n - 1, 0, n // 2, 0, n - 1, 1 % n])  # across shards, unsorted, repeated
    fixed = store.get_batch(idx)
    np.testing.assert_array_equal(fixed["text_states"], _kept(arrays)[idx])
    np.testing.assert_array_equal(fixed["text_mask"], arrays["text_mask"][idx])
    for key in ("image_embeds", "text_embeds"):
        np.testing.assert_array_equal(fixed[key], arrays[key][idx])

    longest = int(np.array(lengths)[idx].max())
    batch = store.get_batch(idx, text_length="batch")
    assert batch["text_states"].shape == (len(idx), longest, 6)
    np.testing.assert_array_equal(batch["text_states"], fixed["text_states"][:, :longest])
    np.testing.assert_array_equal(batch["text_mask"], fixed["text_mask"][:, :longest])

    ragged = store.get_batch(idx, dtype=None, text_length="ragged")
    assert ragged["text_states"].shape == (int(np.array(lengths)[idx].sum()), 6)
    rebuilt = np.zeros_like(fixed["text_states"])
    rebuilt_mask = np.zeros_like(fixed["text_mask"])
    row_of, position = token_positions(ragged["text_rows"], ragged["text_lengths"])
    rebuilt[row_of, position] = ragged["text_states"]
    rebuilt_mask[row_of, position] = ragged["text_mask"]
    np.testing.assert_array_equal(rebuilt, fixed["text_states"])
    np.testing.assert_array_equal(rebuilt_mask, fixed["text_mask"])


def test_dtype_fields_threads_and_iter_batches(tmp_path):
    arrays, meta = _rows([3, 77, 1, 20, 9, 40, 2, 11, 30, 5] * 3)
    store = _write(tmp_path / "s", arrays, meta, dtype="fp16", shard_size=8)
    one = EmbeddingStore(tmp_path / "s", read_threads=1)
    idx = np.random.default_rng(1).permutation(30)[:17]
    half = store.get_batch(idx, dtype=None)
    assert half["text_states"].dtype == np.float16 and half["image_embeds"].dtype == np.float16
    full = one.get_batch(idx)  # one thread, float32: the same values
    assert full["text_states"].dtype == np.float32
    np.testing.assert_array_equal(half["text_states"].astype(np.float32), full["text_states"])
    pooled = store.get_batch(idx, fields=("image_embeds", "text_embeds"))
    assert set(pooled) == {"image_embeds", "text_embeds"}
    with pytest.raises(StoreError, match="no"):
        store.get_batch(idx, fields=("pixels",))
    seen, ring = [], BufferRing(2)
    for b in store.iter_batches(8, split="all", dtype=None, text_length="batch", buffers=ring):
        assert b["text_states"].dtype == np.float16
        np.testing.assert_array_equal(b["text_states"], _half_kept(arrays, b["indices"], b["text_states"].shape[1]))
        seen.extend(b["indices"].tolist())
    assert sorted(seen) == list(range(30))
    first = ring.batch()((4, 3), np.dtype(np.float16))
    ring.batch()((4, 3), np.dtype(np.float16))
    assert np.shares_memory(first, ring.batch()((2, 3), np.dtype(np.float16)))  # reused once the ring comes round


def _half_kept(arrays, idx, length):
    return _kept(arrays)[idx, :length].astype(np.float16)


def _as_version_1(path: Path) -> None:
    """Rewrite a padded-layout manifest exactly as the version-1 writer wrote it (no text_layout fields)."""
    m = json.loads((path / "manifest.json").read_text())
    m["version"] = 1
    for key in ("text_layout", "text_tokens"):
        m.pop(key)
    m["settings"].pop("text_layout")
    (path / "manifest.json").write_text(json.dumps(m))


def test_old_layout_store_reads_trains_and_resumes_in_its_layout(tmp_path):
    arrays, meta = _rows([5, 77, 1, 12, 30, 8] * 6, width=8)
    _write(tmp_path / "old", arrays, meta, layout="padded")
    _as_version_1(tmp_path / "old")
    old = EmbeddingStore(tmp_path / "old")
    assert old.text_layout == "padded" and old.manifest["version"] == 1
    old.validate()
    idx = np.array([35, 1, 17, 2, 1])
    batch = old.get_batch(idx)
    np.testing.assert_array_equal(batch["text_states"], _kept(arrays)[idx])  # padding states read as zeros
    shorter = old.get_batch([35, 2, 17], text_length="batch")["text_states"]  # 8, 1 and 8 tokens
    np.testing.assert_array_equal(shorter, _kept(arrays)[[35, 2, 17], :8])
    run = train(TrainConfig(data=str(tmp_path / "old"), out=str(tmp_path / "run"), preset="tiny", steps=2,
                            batch_size=4, log_every=1, val_every=0, checkpoint_every=2, report_to="none"))
    assert (run / "prior").is_dir()

    # a store started by a version-1 writer (settings without text_layout) resumes in the padded layout
    settings = store_settings(clip_id="tiny", clip_revision="0", image_dim=8, text_dim=8, normalized=False,
                              dtype="fp32", text_seq_len=77, text_state_dim=8)
    started = {k: v for k, v in settings.items() if k != "text_layout"}
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / ".embed-settings.json").write_text(json.dumps(started))
    writer = StoreWriter(tmp_path / "resumed", settings)
    assert writer.settings["text_layout"] == "padded"
    part = {k: v[:6] for k, v in arrays.items()}
    writer.write_shard(0, part, meta[:6])
    writer.finalize(1)
    np.testing.assert_array_equal(
        EmbeddingStore(tmp_path / "resumed").get_batch(np.arange(6))["text_states"], _kept(arrays)[:6]
    )


def test_pooled_only_reads_no_state_bytes(tmp_path):
    arrays, meta = _rows([4, 77, 9, 1, 33, 12, 7, 2] * 4, width=8)
    _write(tmp_path / "s", arrays, meta, dtype="fp16")
    store = EmbeddingStore(tmp_path / "s")
    cfg = TrainConfig(data=str(tmp_path / "s"), batch_size=6, pooled_only=True)
    loader = _Batches(store, DataOrder(store.split_indices("train"), 0), cfg, 0, 1, torch.device("cpu"))
    try:
        for step in range(5):
            batch = loader.get(step)
    finally:
        loader.close()
    assert set(batch) == {"image_embeds", "text_embeds", "caption_ids"}
    assert batch["image_embeds"].dtype == torch.float32  # converted after the copy, from the fp16 store
    # counted: every byte gathered is pooled-vector bytes, 2 x 8 fp16 per row, prefetch included
    rows_read = store.bytes_read["image_embeds"] // (8 * 2)
    assert rows_read >= 5 * 6 and set(store.bytes_read) == {"image_embeds", "text_embeds"}
    assert store.bytes_read["text_embeds"] == rows_read * 8 * 2
    # with states the same loader counts exactly the kept tokens' bytes
    states = EmbeddingStore(tmp_path / "s")
    loader = _Batches(states, DataOrder(states.split_indices("train"), 0), TrainConfig(batch_size=6, num_workers=0),
                      0, 1, torch.device("cpu"))
    rows = loader.order.global_batch(0, 6)
    batch = loader.get(0)
    assert states.bytes_read["text_states"] == text_lengths(arrays["text_mask"][rows]).sum() * 8 * 2
    np.testing.assert_array_equal(batch["text_states"].numpy(), _kept(arrays)[rows].astype(np.float16))

    # end to end: train pooled-only with the state files gone; any read of them would fail
    for shard in (tmp_path / "s").glob("shard-*"):
        for key in STATE_KEYS:
            (shard / f"{key}.npy").unlink()
    run = train(TrainConfig(data=str(tmp_path / "s"), out=str(tmp_path / "run"), preset="tiny", steps=3,
                            batch_size=6, pooled_only=True, verify_store=False, log_every=1, val_every=3,
                            val_steps=2, checkpoint_every=3, report_to="none"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[-1]["split"] == "val"  # validation read no states either


def test_prior_output_and_training_losses_equal_padded_vs_compact(tmp_path):
    """The padded rows as version 1 handed them to the prior (CLIP's values after the last unmasked token) and the
    rows rebuilt from the compact store (zeros there) give the same prediction: the prior's additive -10000 mask
    underflows to exactly 0 attention weight, and the network always sees the store's fixed 77 positions, so the
    reduction lengths and order are the same. Training from either layout gives the same losses."""
    lengths = [int(x) for x in np.random.default_rng(3).integers(1, 78, size=48)]
    arrays, meta = _rows(lengths, width=16)
    _write(tmp_path / "padded", arrays, meta, layout="padded", shard_size=20)
    compact = _write(tmp_path / "compact", arrays, meta, shard_size=20)
    idx = np.random.default_rng(4).permutation(48)[:24]
    a, b = {k: v[idx] for k, v in arrays.items()}, compact.get_batch(idx)
    assert not np.array_equal(a["text_states"], b["text_states"])  # padding values vs zeros
    torch.manual_seed(0)
    prior = EclipsePrior.from_preset("tiny", 16, 77).eval()
    noise = torch.randn(len(idx), 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [prior.training_prediction(torch.from_numpy(x["image_embeds"]), torch.from_numpy(x["text_embeds"]),
                                          torch.from_numpy(x["text_states"]), torch.from_numpy(x["text_mask"]),
                                          noise=noise) for x in (a, b)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # measured bit-equal on CPU, fp32 and bf16

    def losses(store: Path, out: Path) -> list[float]:
        train(TrainConfig(data=str(store), out=str(out), preset="tiny", steps=4, batch_size=8, log_every=1,
                          val_every=0, checkpoint_every=4, report_to="none"))
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "padded", tmp_path / "r1") == pytest.approx(
        losses(tmp_path / "compact", tmp_path / "r2"), abs=1e-6)


def test_damaged_compact_shard_gives_store_error(tmp_path):
    arrays, meta = _rows([3, 77, 9, 1, 20, 5, 2, 40] * 2, width=8)
    _write(tmp_path / "s", arrays, meta, shard_size=8)
    shard = tmp_path / "s" / "shard-00001"
    data = bytearray((shard / "text_states.npy").read_bytes())
    data[-5] ^= 0xFF
    (shard / "text_states.npy").write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00001: checksum mismatch in text_states.npy"):
        EmbeddingStore(tmp_path / "s").validate()

    (shard / "text_offsets.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(StoreError, match="shard-00001: cannot read text_offsets.npy"):
        EmbeddingStore(tmp_path / "s").get_batch([9])

    offsets = np.arange(9, dtype=np.int64) * 100  # parses, but points past the states
    np.save(shard / "text_offsets.npy", offsets)
    with pytest.raises(StoreError, match="shard-00001: ragged text arrays are inconsistent"):
        EmbeddingStore(tmp_path / "s").validate(checksums=False)


def test_loader_hands_the_allocated_pinned_buffers_to_the_copy(tmp_path, monkeypatch):
    """On CUDA the loader reads into pinned tensors and must copy from those very tensors (their storage is what
    the caching host allocator tracks for the non-blocking copy). Without a GPU, pinning is stubbed out and the
    bookkeeping checked: every array the store allocated comes back as the tensor that was allocated for it."""
    arrays, meta = _rows([4, 77, 9, 1, 33, 12, 7, 2] * 2, width=8)
    store = _write(tmp_path / "s", arrays, meta, dtype="fp16")
    allocated: list[torch.Tensor] = []
    empty = torch.empty

    def fake_pinned_empty(*shape, pin_memory=False, **kw):
        tensor = empty(*shape, **kw)
        allocated.append(tensor)
        return tensor

    loader = _Batches(store, DataOrder(store.split_indices("train"), 0), TrainConfig(batch_size=5, num_workers=0),
                      0, 1, torch.device("cpu"))
    loader.pin = True
    monkeypatch.setattr(torch, "empty", fake_pinned_empty)
    host = loader._load(0)
    monkeypatch.undo()
    assert {k for k, v in host.items() if any(v is t for t in allocated)} == {
        "image_embeds", "text_embeds", "text_states", "text_mask"}
    rows = loader.order.global_batch(0, 5)
    batch = loader._to_device(host)
    np.testing.assert_array_equal(batch["text_states"].numpy(), _kept(arrays)[rows].astype(np.float16))
    np.testing.assert_array_equal(batch["text_mask"].numpy(), arrays["text_mask"][rows])
