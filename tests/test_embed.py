"""`embed`: every source type into a store, bad input skipped and counted, SIGKILL resume, CLI errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eclipse_prior.cli import main as cli_main
from eclipse_prior.data.embed import embed
from eclipse_prior.data.sources import open_source
from eclipse_prior.data.store import EmbeddingStore
from eclipse_prior.encoders.clip import load_clip

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_clip_dir):
    return load_clip(tiny_clip_dir)


def _png(seed: int, size=(36, 44)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]], truncate: bool = False) -> Path:
    """img2dataset layout: KEY.jpg/png + KEY.txt (+ KEY.json); ``truncate`` cuts the file inside the last member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if truncate:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            last = tar.getmembers()[-1]
        data = data[: last.offset_data + last.size // 2]
    path.write_bytes(data)
    return path


def _direct(bundle, images: list[Image.Image], captions: list[str]):
    with torch.no_grad():
        return bundle.encode_images(images).numpy(), bundle.encode_text(captions)["text_embeds"].numpy()


def test_image_folder_jsonl_with_bad_input(tmp_path, image_folder, bundle):
    long = " ".join(["blue"] * 100)
    with open(image_folder / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "broken.jpg", "caption": "a broken image"}) + "\n")
        f.write(json.dumps({"file": "img_001.png", "caption": "   "}) + "\n")
        f.write(json.dumps({"file": "missing.png", "caption": "not there"}) + "\n")
        f.write(json.dumps({"file": "img_002.jpg", "caption": long}) + "\n")
    (image_folder / "broken.jpg").write_bytes(
        (image_folder / "img_000.jpg").read_bytes()[:200]
    )  # truncated JPEG
    out = embed(
        image_folder, bundle, tmp_path / "store", dtype="fp32", batch_size=4, shard_size=4, num_workers=0
    )
    store = EmbeddingStore(out)
    store.validate()
    s = store.manifest["summary"]
    assert s["seen"] == 10 and s["rows_written"] == 7 == len(store)
    assert s["skipped"] == {"unreadable_image": 1, "missing_image": 1, "empty_caption": 1}
    assert s["truncated_captions"] == 1
    assert [sh["rows"] for sh in store.manifest["shards"]] == [4, 2, 1]
    captions = [json.loads(x)["caption"] for x in (image_folder / "captions.jsonl").read_text().splitlines()]
    keep = [0, 1, 2, 3, 4, 5, 9]
    files = [json.loads(x)["file"] for x in (image_folder / "captions.jsonl").read_text().splitlines()]
    imgs = [Image.open(image_folder / files[i]).convert("RGB") for i in keep]
    img_ref, txt_ref = _direct(bundle, imgs, [captions[i] for i in keep])
    batch = store.get_batch(np.arange(7))
    np.testing.assert_allclose(batch["image_embeds"], img_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch["text_embeds"], txt_ref, rtol=1e-5, atol=1e-5)
    assert store.row_ids([0, 6]) == ["img_000.jpg", "img_002.jpg"] and store.captions([6]) == [long.strip()]
    ids = store.caption_ids(np.arange(7))
    assert ids[0] == ids[4] and len(set(ids.tolist())) == 6  # "a red square" twice
    assert not store.has_text_states and not store.normalized and store.clip_id == str(bundle.name)


def test_image_folder_csv_and_txt_sidecars_give_the_same_rows(tmp_path, image_folder, bundle):
    rows = [json.loads(x) for x in (image_folder / "captions.jsonl").read_text().splitlines()]
    csv_dir, txt_dir = tmp_path / "csv", tmp_path / "txt"
    csv_dir.mkdir(), txt_dir.mkdir()
    lines = ["image,caption"]
    for r in rows:
        data = (image_folder / r["file"]).read_bytes()
        (csv_dir / r["file"]).write_bytes(data)
        (txt_dir / r["file"]).write_bytes(data)
        (txt_dir / r["file"]).with_suffix(".txt").write_text(r["caption"] + "\n")
        lines.append(f'{r["file"]},"{r["caption"]}"')
    (csv_dir / "captions.csv").write_text("\n".join(lines) + "\n")
    a = EmbeddingStore(embed(csv_dir, bundle, tmp_path / "a", dtype="fp32", num_workers=0, progress=False))
    b = EmbeddingStore(embed(txt_dir, bundle, tmp_path / "b", dtype="fp32", num_workers=0, progress=False))
    assert len(a) == len(b) == len(rows)
    assert a.captions(np.arange(6)) == b.captions(np.arange(6)) == [r["caption"] for r in rows]
    np.testing.assert_array_equal(
        a.get_batch(np.arange(6))["image_embeds"], b.get_batch(np.arange(6))["image_embeds"]
    )
    assert a.manifest["source"]["kind"] == "image_folder"


def test_webdataset_tars_list_file_pipe_and_broken_members(tmp_path, bundle):
    good = [(f"{i:09d}", {"png": _png(i), "txt": f"a red square number {i}".encode()}) for i in range(5)]
    good[1] = (
        good[1][0],
        {"png": _png(1), "json": json.dumps({"caption": "a blue circle", "url": "http://x/1"}).encode()},
    )
    good[2] = (good[2][0], {"jpg": b"not an image", "txt": b"a green star"})  # corrupt image member
    good[3] = (good[3][0], {"png": _png(3), "txt": b""})  # empty caption
    _write_tar(tmp_path / "part-00000.tar", good)
    tail = [(f"1{i:08d}", {"png": _png(10 + i), "txt": f"a cyan ring {i}".encode()}) for i in range(3)]
    _write_tar(tmp_path / "part-00001.tar", tail, truncate=True)  # broken last member
    _write_tar(tmp_path / "part-00002.tar", [("200000000", {"png": _png(20), "txt": b"a yellow heart"})])
    listing = tmp_path / "shards.txt"
    listing.write_text(f"{tmp_path}/part-{{00000..00001}}.tar\npipe:cat {tmp_path}/part-00002.tar\n")
    src = open_source(listing, allow_pipe_in_list=True)
    assert src.kind == "webdataset" and len(src.units()) == 3
    store = EmbeddingStore(
        embed(listing, bundle, tmp_path / "store", dtype="fp16", num_workers=2, progress=False,
              allow_pipe_in_list=True)
    )
    store.validate()
    s = store.manifest["summary"]
    assert s["skipped"] == {"unreadable_image": 1, "empty_caption": 1, "truncated_tar": 1}
    assert store.row_ids(np.arange(len(store)))[:3] == [
        "part-00000.tar/000000000",
        "part-00000.tar/000000001",
        "part-00000.tar/000000004",
    ]
    assert store.row_ids([len(store) - 1]) == ["part-00002.tar/200000000"]
    assert store.captions([1]) == ["a blue circle"] and store.meta([1])[0]["source"] == "http://x/1"
    rows_of = [sh["rows"] for sh in store.manifest["shards"]]
    assert rows_of[0] == 3 and rows_of[2] == 1 and 1 <= rows_of[1] <= 2  # rows before the cut survive
    imgs = [Image.open(io.BytesIO(_png(i))).convert("RGB") for i in (0, 1, 4)]
    img_ref, txt_ref = _direct(
        bundle, imgs, ["a red square number 0", "a blue circle", "a red square number 4"]
    )
    got = store.get_batch([0, 1, 2])
    np.testing.assert_allclose(got["image_embeds"], img_ref, rtol=2e-3, atol=2e-3)  # fp16 store
    np.testing.assert_allclose(got["text_embeds"], txt_ref, rtol=2e-3, atol=2e-3)


def _clip_retrieval(root: Path, bundle, n_parts=2, rows=5) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    expect = {"img": [], "txt": [], "captions": []}
    for p in range(n_parts):
        img = rng.normal(size=(rows, bundle.embed_dim))
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        captions = [f"a red square {p} {i}" for i in range(rows)]
        txt = bundle.encode_text(captions)["text_embeds"].numpy()
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        if p == 0:
            img[1, 0] = np.nan  # non-finite vector: skipped
            captions[2] = ""  # empty caption: skipped
        np.save(root / "img_emb" / f"img_emb_{p}.npy", img.astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{p}.npy", txt.astype(np.float16))
        table = pa.table({"caption": captions, "url": [f"http://e/{p}/{i}" for i in range(rows)]})
        pq.write_table(table, root / "metadata" / f"metadata_{p}.parquet")
        keep = [i for i in range(rows) if not (p == 0 and i in (1, 2))]
        expect["img"].append(img[keep].astype(np.float16))
        expect["txt"].append(txt[keep].astype(np.float16))
        expect["captions"] += [captions[i] for i in keep]
    return {k: np.concatenate(v) if k != "captions" else v for k, v in expect.items()}


def test_clip_retrieval_ingest_is_normalized_and_not_reencoded(tmp_path, bundle):
    expect = _clip_retrieval(tmp_path / "cr", bundle)
    store = EmbeddingStore(
        embed(tmp_path / "cr", bundle, tmp_path / "s", dtype="fp16", shard_size=3, num_workers=0)
    )
    store.validate()
    assert store.normalized and store.manifest["source"]["kind"] == "clip_retrieval"
    assert store.manifest["summary"]["skipped"] == {"nonfinite_embedding": 1, "empty_caption": 1}
    assert len(store) == 8 and [sh["rows"] for sh in store.manifest["shards"]] == [1, 2, 3, 2]
    got = store.get_batch(np.arange(8))
    np.testing.assert_array_equal(got["image_embeds"], expect["img"].astype(np.float32))  # taken as is
    np.testing.assert_array_equal(got["text_embeds"], expect["txt"].astype(np.float32))
    assert store.captions(np.arange(8)) == expect["captions"]
    assert store.meta([0])[0]["source"] == "http://e/0/0"
    # token states wanted: text re-encoded for the states only, image vectors still not touched
    states = EmbeddingStore(
        embed(
            tmp_path / "cr",
            bundle,
            tmp_path / "t",
            text_states=True,
            shard_size=3,
            num_workers=0,
            progress=False,
        )
    )
    b = states.get_batch(np.arange(8))
    np.testing.assert_array_equal(b["image_embeds"], got["image_embeds"])
    ref = bundle.encode_text(expect["captions"], with_states=True)
    kept = ref["text_mask"].numpy()  # the compact store keeps states up to the last unmasked token, zeros after
    np.testing.assert_allclose(b["text_states"], ref["text_states"].numpy() * kept[..., None], rtol=3e-3, atol=3e-3)
    np.testing.assert_array_equal(b["text_mask"], ref["text_mask"].numpy())
    assert states.text_seq_len == 77 and states.text_state_dim == 32
    # no text_emb/ in the folder: pooled text is re-encoded and L2-normalised to match the image vectors
    shutil.copytree(tmp_path / "cr", tmp_path / "cr2", ignore=shutil.ignore_patterns("text_emb*"))
    reenc = EmbeddingStore(embed(tmp_path / "cr2", bundle, tmp_path / "u", dtype="fp32", num_workers=0))
    assert reenc.normalized and not reenc.has_text_states
    np.testing.assert_allclose(
        reenc.get_batch(np.arange(8))["text_embeds"], expect["txt"], rtol=2e-3, atol=2e-3
    )


def _gated_source(tmp: Path) -> tuple[Path, Path]:
    """Three tars; the middle one comes through a pipe: command that waits for a gate file (a stalled download)."""
    for t in range(3):
        samples = [
            (f"{t}{i:05d}", {"png": _png(100 * t + i), "txt": f"a red star {t} {i}".encode()})
            for i in range(5)
        ]
        _write_tar(tmp / f"p{t}.tar", samples)
    gate = tmp / "gate"
    listing = tmp / "shards.txt"
    listing.write_text(
        f"{tmp}/p0.tar\npipe:sh -c 'while [ ! -e {gate} ]; do sleep 0.05; done; cat {tmp}/p1.tar'\n{tmp}/p2.tar\n"
    )
    return listing, gate


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tiny_clip_dir):
    listing, gate = _gated_source(tmp_path)
    args = [
        "embed",
        str(listing),
        "--clip",
        str(tiny_clip_dir),
        "--out",
        str(tmp_path / "killed"),
        "--text-states",
        "--batch-size",
        "2",
        "--num-workers",
        "2",
        "--no-progress",
        "--allow-pipe-in-list",  # the listing's pipe: line is this test's own stalled download
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eclipse_prior", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = tmp_path / "killed" / "shard-00000"
    deadline = time.monotonic() + 300  # a safeguard against hanging, not a timing assertion
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no shard appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # the process, its data-loader workers and the stalled pipe
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (
        not (tmp_path / "killed" / "manifest.json").exists()
        and not (tmp_path / "killed" / "shard-00001").exists()
    )
    stamp = (first / "shard.json").stat().st_mtime_ns
    gate.touch()
    assert cli_main(args) == 0  # rerun the same command: resumes
    assert (first / "shard.json").stat().st_mtime_ns == stamp  # finished shard kept, not redone
    assert cli_main(["embed", *args[1:4], "--out", str(tmp_path / "full"), *args[6:]]) == 0
    killed, full = EmbeddingStore(tmp_path / "killed"), EmbeddingStore(tmp_path / "full")
    killed.validate()
    assert killed.manifest["shards"] == full.manifest["shards"]  # same rows and byte-identical files
    assert killed.manifest["summary"] == full.manifest["summary"] and len(killed) == 15
    a, b = killed.get_batch(np.arange(15)), full.get_batch(np.arange(15))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert killed.row_ids(np.arange(15)) == full.row_ids(np.arange(15))


def test_settings_change_on_resume_and_missing_clip_are_one_line_errors(
    tmp_path, image_folder, tiny_clip_dir, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "s")
    assert cli_main(["embed", str(image_folder), "--clip", "no-org/no-clip", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no-org/no-clip" in err and "local folder" in err
    base = ["embed", str(image_folder), "--clip", str(tiny_clip_dir), "--out", out, "--num-workers", "0"]
    assert cli_main([*base, "--no-progress"]) == 0
    assert cli_main([*base, "--dtype", "fp32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "different settings" in err and "dtype" in err
    assert cli_main(["embed", str(tmp_path / "nothing"), "--clip", str(tiny_clip_dir), "--out", out]) == 2
    assert "not found" in capsys.readouterr().err


def test_pipe_lines_in_a_list_file_are_refused_unless_allowed(tmp_path, tiny_clip_dir, capsys):
    """A list file's pipe: line would run a shell command during embed: refused (nothing runs) without the flag."""
    _write_tar(tmp_path / "part-00000.tar", [("000000000", {"png": _png(0), "txt": b"a red square"})])
    marker = tmp_path / "ran"
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# from a downloaded dataset\npipe:touch {marker}; cat {tmp_path}/part-00000.tar\n")
    argv = ["embed", str(listing), "--clip", str(tiny_clip_dir), "--num-workers", "0", "--no-progress"]
    assert cli_main([*argv, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 2" in err and "--allow-pipe-in-list" in err, err
    assert not marker.exists() and not (tmp_path / "refused" / "manifest.json").exists()
    assert cli_main([*argv, "--out", str(tmp_path / "allowed"), "--allow-pipe-in-list"]) == 0
    assert marker.exists() and len(EmbeddingStore(tmp_path / "allowed")) == 1
    # a pipe: given as SOURCE itself is the user's own command and stays allowed
    direct = open_source(f"pipe:cat {tmp_path}/part-00000.tar")
    assert direct.kind == "webdataset" and len(direct.units()) == 1


def test_malformed_captions_lines_are_skipped_and_counted(tmp_path, image_folder, bundle, capsys):
    """A broken captions.jsonl line (or a short CSV row) is one skipped row with a reason, never a traceback."""
    lines = (image_folder / "captions.jsonl").read_text().splitlines()
    lines[1:1] = ["{broken json", "[1, 2]"]
    (image_folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    logged: list[str] = []
    store = EmbeddingStore(embed(image_folder, bundle, tmp_path / "a", dtype="fp32", num_workers=0,
                                 progress=False, log=logged.append))
    s = store.manifest["summary"]
    assert s["skipped"] == {"bad_caption_line": 2} and s["seen"] == 8 and len(store) == 6
    assert any("malformed" in x and "line 2, 3" in x and "captions.jsonl" in x for x in logged), logged
    assert store.captions([0, 1]) == [json.loads(lines[0])["caption"], json.loads(lines[3])["caption"]]

    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    rows = [json.loads(x) for x in lines if x.startswith('{"')]
    for r in rows:
        (csv_dir / r["file"]).write_bytes((image_folder / r["file"]).read_bytes())
    body = [f'{r["file"]},"{r["caption"]}"' for r in rows]
    body[2:2] = ["img_000.jpg", 'img_001.png,"a cat",extra']  # a short row and a long row
    (csv_dir / "captions.csv").write_text("\n".join(["image,caption", *body]) + "\n")
    logged.clear()
    csv_store = EmbeddingStore(embed(csv_dir, bundle, tmp_path / "b", dtype="fp32", num_workers=0,
                                     progress=False, log=logged.append))
    assert csv_store.manifest["summary"]["skipped"] == {"bad_caption_line": 2} and len(csv_store) == 6
    assert any("line 4, 5" in x and "captions.csv" in x for x in logged), logged
