"""Hostile and clumsy inputs to `eclipse-prior embed`, each through the real CLI.

Every case asserts its outcome class: a one-line error with exit 2, a skip counted under its reason in the store
manifest, or a correct result (an image variant embedded exactly like its plain twin); and that nothing outside
the output folder changed (the whole test folder is snapshotted before and after). Hangs are guarded by an alarm,
so a FIFO that blocked would fail the case instead of stalling CI.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eclipse_prior.cli import main as cli_main
from eclipse_prior.data.store import EmbeddingStore
from eclipse_prior.outputs import LOCK_NAME, claim_dir

BASE_CAPTIONS = ["a red square", "a blue circle"]


# --------------------------------------------------------------------------------------------------- helpers
def _rgb(seed: int, size=(40, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares ``width`` x ``height`` (what a decompression bomb looks like from its header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b""
    )


def _folder(root: Path, extra: list[tuple[str, str]] = (), files: dict[str, bytes | None] | None = None) -> Path:
    """Two good images plus ``extra`` (file, caption) rows in captions.jsonl; ``files`` are written as given."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, caption in enumerate(BASE_CAPTIONS):
        (root / f"good_{i}.png").write_bytes(_encode(Image.fromarray(_rgb(i))))
        rows.append({"file": f"good_{i}.png", "caption": caption})
    for name, data in (files or {}).items():
        if data is not None:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    rows += [{"file": f, "caption": c} for f, c in extra]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _tar_samples(n: int, seed: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"{i:09d}", {"png": _encode(Image.fromarray(_rgb(seed + i))), "txt": f"a green star {i}".encode()})
        for i in range(n)
    ]


def _snapshot(root: Path, skip: Path | None) -> dict[str, tuple]:
    """Every entry under ``root`` except ``skip``: type, mode, size, mtime and content digest (a store's lock
    file, rewritten by every claim, aside)."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        if skip is not None and (here == skip or skip in here.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if (skip is not None and p == skip) or name == LOCK_NAME:
                continue
            st = os.lstat(p)
            digest = None
            if p.is_file() and not p.is_symlink():
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            seen[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return seen


class _Alarm:
    """Fail instead of hanging: SIGALRM interrupts a blocking open() or read() in this (the main) thread."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self):
        def fire(signum, frame):
            raise TimeoutError(f"embed hung for {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, fire)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def _embed(capsys, source, out, clip, *extra: str) -> tuple[int, str, str]:
    argv = ["embed", str(source), "--clip", str(clip), "--out", str(out), "--num-workers", "0", "--no-progress",
            "--dtype", "fp32", *extra]
    with _Alarm(120):
        rc = cli_main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    """A hostile input: ``build(tmp)`` returns SOURCE (and may plant files); the rest says what must happen."""

    name: str
    build: Callable[[Path], Path]
    args: tuple[str, ...] = ()
    error: tuple[str, ...] | None = None  # one-line error containing these, exit 2
    skipped: dict[str, int] = field(default_factory=dict)  # else: exit 0 with exactly these skip counts
    rows: int | None = None
    check: Callable[[EmbeddingStore, Path, str], None] | None = None
    clip: Callable[[Path, Path], Path] | None = None  # (tmp, tiny clip) -> CLIP folder to use
    out: Callable[[Path], Path] | None = None  # tmp -> --out (default tmp/out)
    env: dict[str, str] = field(default_factory=dict)  # "{tmp}" is replaced by the test folder


def _twins_equal(store: EmbeddingStore, tmp: Path, stdout: str) -> None:
    """Rows 2 and 3 are one picture stored two ways: their embeddings must be equal."""
    emb = store.get_batch(np.arange(len(store)))["image_embeds"]
    assert len(store) == 4
    np.testing.assert_allclose(emb[2], emb[3], rtol=1e-6, atol=1e-6)
    assert not np.allclose(emb[0], emb[2])  # and differ from an unrelated image


def _twin_case(name: str, plain: Image.Image, variant: bytes, fmt: str = "png") -> Case:
    files = {"plain.png": _encode(plain), f"variant.{fmt}": variant}
    rows = [("plain.png", "a gray photo"), (f"variant.{fmt}", "a gray photo")]
    return Case(name, lambda tmp: _folder(tmp / "src", rows, files), rows=4, check=_twins_equal)


def _grey(seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(36, 44), dtype=np.uint8)


def _sixteen_bit() -> Case:
    g = _grey()
    return _twin_case("16-bit greyscale PNG equals its 8-bit twin", Image.fromarray(g),
                      _encode(Image.fromarray(g.astype(np.uint16) * 257)))


def _float_tiff() -> Case:
    g = _grey()
    return _twin_case("float (F) TIFF in 0..1 equals its 8-bit twin", Image.fromarray(g),
                      _encode(Image.fromarray(g.astype(np.float32) / 255), "TIFF"), "tif")


def _exif_rotated() -> Case:
    rgb = _rgb(7, (30, 50))
    stored = Image.fromarray(rgb)
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    upright = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270)
    return _twin_case("EXIF-rotated photo equals the pre-rotated one", upright, _encode(stored, exif=exif))


def _transparent() -> Case:
    rgb = _rgb(8)
    alpha = (np.random.default_rng(9).random(rgb.shape[:2]) > 0.5).astype(np.uint8) * 255
    composited = np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8)  # on white
    rgba = np.dstack([rgb, alpha])
    return _twin_case("RGBA is composited on white", Image.fromarray(composited), _encode(Image.fromarray(rgba)))


def _palette_transparent() -> Case:
    g = (_grey() // 64 * 64).astype(np.uint8)  # four grey levels, the darkest transparent
    pal = Image.fromarray(g).convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[g == 0][0])
    plain = np.where(g == 0, 255, g).astype(np.uint8)
    return _twin_case("palette with a transparent index is composited on white", Image.fromarray(plain),
                      _encode(pal, transparency=pal.info["transparency"]))


def _one_bit() -> Case:
    g = np.where(_grey() > 127, 255, 0).astype(np.uint8)
    return _twin_case("1-bit image equals its 0/255 twin", Image.fromarray(g), _encode(Image.fromarray(g).convert("1")))


def _truncated_png() -> bytes:
    data = _encode(Image.fromarray(_rgb(3, (200, 300))))
    return data[: len(data) // 2]


def _outside(tmp: Path, how: str) -> Path:
    outside = tmp / "elsewhere" / "secret.png"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(_encode(Image.fromarray(_rgb(4))))
    root = tmp / "src"
    name = {"absolute": str(outside), "dotdot": "../elsewhere/secret.png", "symlink": "link.png"}[how]
    _folder(root, [(name, "a secret")])
    if how == "symlink":
        (root / "link.png").symlink_to(outside)
    return root


def _fifo_folder(tmp: Path) -> Path:
    root = _folder(tmp / "src", [("x.jpg", "a pipe"), ("dir.jpg", "a folder")])
    os.mkfifo(root / "x.jpg")
    (root / "dir.jpg").mkdir()
    return root


def _latin1_captions(tmp: Path) -> Path:
    root = _folder(tmp / "src")
    text = (root / "captions.jsonl").read_text().replace("a red square", "a red caf\u00e9 square")
    (root / "captions.jsonl").write_bytes(text.encode("latin-1"))
    return root


def _bom_csv(tmp: Path) -> Path:
    root = _folder(tmp / "src")
    (root / "captions.jsonl").unlink()
    body = "image,caption\r\n" + "".join(f"good_{i}.png,{c}\r\n" for i, c in enumerate(BASE_CAPTIONS))
    (root / "captions.csv").write_bytes(b"\xef\xbb\xbf" + body.encode())
    return root


def _cp1252_sidecars(tmp: Path) -> Path:
    root = tmp / "src"
    root.mkdir()
    for i, caption in enumerate(["a red caf\u00e9 \u2013 square", "a blue circle"]):
        (root / f"img_{i}.png").write_bytes(_encode(Image.fromarray(_rgb(i))))
        (root / f"img_{i}.txt").write_bytes(caption.encode("cp1252"))
    return root


def _undecodable_name(tmp: Path) -> Path:
    root = _folder(tmp / "src")
    (root / "captions.jsonl").unlink()
    for i, caption in enumerate(BASE_CAPTIONS):
        (root / f"good_{i}.txt").write_text(caption)
    name = os.fsencode(root) + b"/caf\xe9"
    with open(name + b".png", "wb") as f:
        f.write(_encode(Image.fromarray(_rgb(9))))
    with open(name + b".txt", "wb") as f:
        f.write(b"a cafe photo")
    return root


def _undecodable_check(store: EmbeddingStore, tmp: Path, stdout: str) -> None:
    assert "caf\\udce9.png" in store.row_ids([0, 1, 2]) and "a cafe photo" in store.captions([0, 1, 2])
    assert store.manifest["summary"]["notes"] == {"text_with_invalid_unicode_escaped": 1}


def _tar_source(tmp: Path, how: str) -> Path:
    samples = _tar_samples(3)
    if how == "latin1":
        samples[1][1]["txt"] = "a caf\u00e9 star".encode("latin-1")
    if how == "large-member":
        samples[1][1]["png"] = _encode(Image.fromarray(_rgb(20, (200, 200))))
    (tmp / "shards").mkdir()
    path = _tar(tmp / "shards" / "00000.tar", samples)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith(samples[2][0])][0]
    if how in ("boundary", "boundary+stats"):
        path.write_bytes(data[: third.offset])  # ends exactly after sample 2: no end-of-archive marker
    if how == "boundary+stats":  # img2dataset's stats say 3 samples were written
        (tmp / "shards" / "00000_stats.json").write_text(json.dumps({"successes": 3}))
    if how == "mid-member":
        path.write_bytes(data[: third.offset_data + 10])
    if how == "garbage":
        (tmp / "shards" / "00001.tar").write_bytes(b"\x07" * 3000)
    if how == "fifo":
        os.mkfifo(tmp / "shards" / "00001.tar")
    return tmp / "shards"


def _list_file(tmp: Path, line: Callable[[Path, Path], str]) -> Path:
    tar = _tar(tmp / "good.tar", _tar_samples(2))
    listing = tmp / "shards.txt"
    listing.write_text(line(tar, tmp / "MARKER") + "\n")
    return listing


def _clip_retrieval(tmp: Path, rows: dict[str, int]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp / "cr"
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for kind in ("img_emb", "text_emb"):
        v = rng.normal(size=(rows[kind], 32))
        np.save(root / kind / f"{kind}_0.npy", (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16))
    pq.write_table(pa.table({"caption": [f"a red square {i}" for i in range(rows["metadata"])]}),
                   root / "metadata" / "metadata_0.parquet")
    return root


def _fifo_captions(tmp: Path) -> Path:
    root = _folder(tmp / "src")
    (root / "captions.jsonl").unlink()
    os.mkfifo(root / "captions.jsonl")
    return root


def _fifo_clip_retrieval(tmp: Path) -> Path:
    root = _clip_retrieval(tmp, {"img_emb": 5, "text_emb": 5, "metadata": 5})
    (root / "text_emb" / "text_emb_0.npy").unlink()
    os.mkfifo(root / "text_emb" / "text_emb_0.npy")
    return root


def _pickle_only_clip(tmp: Path, clip: Path) -> Path:
    folder = tmp / "clip"
    shutil.copytree(clip, folder)
    (folder / "model.safetensors").unlink()

    class Payload:  # unpickling this would create the marker: it must never happen
        def __reduce__(self):
            return (open, (str(tmp / "UNPICKLED"), "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    return folder


def _damaged_config_clip(tmp: Path, clip: Path) -> Path:
    folder = tmp / "clip"
    shutil.copytree(clip, folder)
    (folder / "config.json").write_text('{"text_config": {"hidden_size": 32,')
    return folder


def _out_file(tmp: Path) -> Path:
    (tmp / "out.txt").write_text("my notes")
    return tmp / "out.txt"


def _out_user_folder(tmp: Path) -> Path:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "LICENSE").write_text("keep me")
    return tmp / "mine"


def _manifest_note(key: str, value) -> Callable:
    def check(store: EmbeddingStore, tmp: Path, stdout: str) -> None:
        notes = store.manifest["summary"].get("notes", {})
        assert notes.get(key) == value, store.manifest["summary"]

    return check


def _latin1_check(store: EmbeddingStore, tmp: Path, stdout: str) -> None:
    assert store.captions([0]) == ["a red caf\u00e9 square"]
    assert store.manifest["text_not_utf8"] == {"captions.jsonl": 1}
    assert "captions.jsonl is not valid UTF-8 (1 invalid" in stdout and "cp1252" in stdout, stdout


def _sidecar_check(store: EmbeddingStore, tmp: Path, stdout: str) -> None:
    assert store.captions([0, 1]) == ["a red caf\u00e9 \u2013 square", "a blue circle"]
    assert "1 sidecar .txt caption file(s) is not valid UTF-8" in stdout, stdout


def _outside_embedded(store: EmbeddingStore, tmp: Path, stdout: str) -> None:
    assert store.captions([2]) == ["a secret"]


CASES = [
    Case("FIFO and folder named .jpg are skipped, never opened", _fifo_folder,
         skipped={"not_regular_file": 2}, rows=2),
    Case("garbage bytes named .png", lambda t: _folder(t / "src", [("bad.png", "x y")], {"bad.png": b"\0" * 300}),
         skipped={"unreadable_image": 1}, rows=2),
    Case("truncated PNG", lambda t: _folder(t / "src", [("cut.png", "a cut")], {"cut.png": _truncated_png()}),
         skipped={"truncated_image": 1}, rows=2),
    Case("missing image", lambda t: _folder(t / "src", [("gone.png", "a ghost")]),
         skipped={"missing_image": 1}, rows=2),
    Case("header declares 9000 x 9000 (over the 64 MP default)",
         lambda t: _folder(t / "src", [("bomb.png", "a bomb")], {"bomb.png": _png_header_only(9000, 9000)}),
         skipped={"image_too_many_pixels": 1}, rows=2),
    Case("header declares 100000 x 100000 (a decompression bomb)",
         lambda t: _folder(t / "src", [("bomb.png", "a bomb")], {"bomb.png": _png_header_only(100_000, 100_000)}),
         skipped={"image_too_many_pixels": 1}, rows=2),
    Case("--max-image-pixels applies to ordinary images",
         lambda t: _folder(t / "src", [("big.png", "a big one")], {"big.png": _encode(Image.fromarray(_rgb(5, (60, 60))))}),
         args=("--max-image-pixels", "2500"), skipped={"image_too_many_pixels": 1}, rows=2),
    Case("--max-image-mb caps the file size",
         lambda t: _folder(t / "src", [("big.png", "a big one")], {"big.png": b"\0" * 30_000}),
         args=("--max-image-mb", "0.02"), skipped={"image_file_too_large": 1}, rows=2),
    Case("a format outside the raster list (PPM) is not even identified",
         lambda t: _folder(t / "src", [("odd.png", "an odd one")], {"odd.png": _encode(Image.fromarray(_rgb(6)), "PPM")}),
         skipped={"unreadable_image": 1}, rows=2),
    Case("1 x 150 image (a shortest-edge resize would explode)",
         lambda t: _folder(t / "src", [("thin.png", "a thin one")], {"thin.png": _encode(Image.new("RGB", (150, 1)))}),
         skipped={"image_extreme_aspect_ratio": 1}, rows=2),
    Case("NUL byte in a captions file name", lambda t: _folder(t / "src", [("good_0.png\u0000x", "a nul")]),
         skipped={"bad_file_name": 1}, rows=2),
    Case("lone surrogate in a caption is escaped and counted",
         lambda t: _folder(t / "src", [("good_0.png", "a red \ud800 square")]), rows=3,
         check=_manifest_note("text_with_invalid_unicode_escaped", 1)),
    Case("file name that is not UTF-8", _undecodable_name, rows=3, check=_undecodable_check),
    Case("absolute path outside SOURCE", lambda t: _outside(t, "absolute"), skipped={"outside_source": 1}, rows=2),
    Case("../ path outside SOURCE", lambda t: _outside(t, "dotdot"), skipped={"outside_source": 1}, rows=2),
    Case("symlink leading out of SOURCE", lambda t: _outside(t, "symlink"), skipped={"outside_source": 1}, rows=2),
    Case("--allow-outside-source reads it", lambda t: _outside(t, "dotdot"), args=("--allow-outside-source",),
         rows=3, check=_outside_embedded),
    _sixteen_bit(),
    _float_tiff(),
    _exif_rotated(),
    _transparent(),
    _palette_transparent(),
    _one_bit(),
    Case("Latin-1 captions.jsonl: named, counted fallback", _latin1_captions, rows=2, check=_latin1_check),
    Case("captions.csv with a UTF-8 BOM", _bom_csv, rows=2),
    Case("cp1252 sidecar captions", _cp1252_sidecars, rows=2, check=_sidecar_check),
    Case("tar: non-UTF-8 caption is counted", lambda t: _tar_source(t, "latin1"), rows=3,
         check=_manifest_note("tar_caption_not_utf8_read_as_cp1252", 1)),
    Case("a .tar that is not a tar", lambda t: _tar_source(t, "garbage"), skipped={"unreadable_tar": 1}, rows=3),
    Case("tar cut at a member boundary", lambda t: _tar_source(t, "boundary"), skipped={"truncated_tar": 1}, rows=2),
    Case("tar cut at a boundary, stats.json says 3", lambda t: _tar_source(t, "boundary+stats"),
         skipped={"truncated_tar": 1, "tar_samples_missing": 1}, rows=2),
    Case("tar cut inside a member", lambda t: _tar_source(t, "mid-member"), skipped={"truncated_tar": 1}, rows=2),
    Case("tar image member over --max-image-mb is skipped unread", lambda t: _tar_source(t, "large-member"),
         args=("--max-image-mb", "0.05"), skipped={"image_file_too_large": 1}, rows=2),
    Case("FIFO named .tar in a tar folder", lambda t: _tar_source(t, "fifo"), skipped={"not_regular_file": 1},
         rows=3),
    Case("pipe: inside a brace pattern of a list line",
         lambda t: _list_file(t, lambda tar, m: f"{{{tar},pipe:touch {m}}}"), error=("--allow-pipe-in-list",)),
    Case("pipe: after :: in a list line",
         lambda t: _list_file(t, lambda tar, m: f"{tar}::pipe:touch {m}"), error=("--allow-pipe-in-list",)),
    Case("PIPE: in capitals in a list line",
         lambda t: _list_file(t, lambda tar, m: f"  PIPE:touch {m}"), error=("--allow-pipe-in-list",)),
    Case("pipe: hidden in a ${WDS_...} variable of a list line",
         lambda t: _list_file(t, lambda tar, m: f"{tar}::${{SHARD}}"), env={"WDS_SHARD": "pipe:touch {tmp}/MARKER"},
         error=("--allow-pipe-in-list",)),
    Case("a list line whose braces expand to a billion URLs",
         lambda t: _list_file(t, lambda tar, m: f"{t}/{{0..999999999}}.tar"), error=("more than 1000000",)),
    Case("a FIFO named captions.jsonl", _fifo_captions, error=("captions.jsonl is not a regular file",)),
    Case("a FIFO where clip-retrieval's text_emb belongs", _fifo_clip_retrieval,
         error=("text_emb_0.npy is not a regular file",)),
    Case("clip-retrieval text_emb has fewer rows",
         lambda t: _clip_retrieval(t, {"img_emb": 5, "text_emb": 4, "metadata": 5}),
         error=("img_emb/img_emb_0.npy 5", "text_emb/text_emb_0.npy 4", "metadata/metadata_0.parquet 5")),
    Case("clip-retrieval metadata has more rows",
         lambda t: _clip_retrieval(t, {"img_emb": 5, "text_emb": 5, "metadata": 7}),
         error=("metadata/metadata_0.parquet 7",)),
    Case("CLIP folder holding only a pickle", lambda t: _folder(t / "src"), clip=_pickle_only_clip,
         error=("pytorch_model.bin", "model.safetensors")),
    Case("CLIP folder with a damaged config.json", lambda t: _folder(t / "src"), clip=_damaged_config_clip,
         error=("config.json is damaged",)),
    Case("--out names a file", lambda t: _folder(t / "src"), out=_out_file, error=("is a file",)),
    Case("--out is a folder of the user's files", lambda t: _folder(t / "src"), out=_out_user_folder,
         error=("not an embedding store",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, tmp_path, tiny_clip_dir, capsys, monkeypatch, one_torch_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, value in case.env.items():
        monkeypatch.setenv(name, value.replace("{tmp}", str(tmp_path)))
    source = case.build(tmp_path)
    clip = case.clip(tmp_path, tiny_clip_dir) if case.clip else tiny_clip_dir
    out = case.out(tmp_path) if case.out else tmp_path / "out"
    owned = None if case.out else out  # a user's file or folder given as --out must stay untouched too
    before = _snapshot(tmp_path, owned)
    rc, stdout, err = _embed(capsys, source, out, clip, *case.args)
    assert _snapshot(tmp_path, owned) == before, "something outside the output folder changed"
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "UNPICKLED").exists()
    if case.error:
        _one_line_error(rc, err, *case.error)
        assert not (out / "manifest.json").exists()
        return
    assert rc == 0 and "Traceback" not in err, err
    store = EmbeddingStore(out)
    store.validate()
    summary = store.manifest["summary"]
    assert summary["skipped"] == case.skipped, summary
    if case.rows is not None:
        assert len(store) == case.rows
    if case.check:
        case.check(store, tmp_path, stdout)


def test_a_pipe_line_runs_only_with_the_flag(tmp_path, tiny_clip_dir, capsys, monkeypatch):
    """The pipe cases above would have run: with --allow-pipe-in-list the same line does create the marker."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    listing = _list_file(tmp_path, lambda tar, m: f"{tar}::pipe:touch {m}")
    rc, _, err = _embed(capsys, listing, tmp_path / "out", tiny_clip_dir, "--allow-pipe-in-list")
    assert rc == 0 and (tmp_path / "MARKER").exists(), err
    assert len(EmbeddingStore(tmp_path / "out")) == 2  # the good tar's rows; the command printed no tar


def _store_rows(path: Path) -> tuple[list[str], np.ndarray]:
    store = EmbeddingStore(path)
    return store.row_ids(np.arange(len(store))), store.get_batch(np.arange(len(store)))["image_embeds"]


def test_resume_after_source_changed_is_refused_then_reembeds_only_what_changed(
    tmp_path, tiny_clip_dir, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "src"
    root.mkdir()
    for i in range(5):
        (root / f"img_{i}.png").write_bytes(_encode(Image.fromarray(_rgb(i))))
        (root / f"img_{i}.txt").write_text(f"a red square {i}")
    out = tmp_path / "out"
    shard = ("--shard-size", "2")
    assert _embed(capsys, root, out, tiny_clip_dir, *shard)[0] == 0
    first_shard = (out / "shard-00000" / "shard.json").stat().st_mtime_ns
    # an image added in the middle of the listing, one changed, and one removed
    (root / "img_1b.png").write_bytes(_encode(Image.fromarray(_rgb(10))))
    (root / "img_1b.txt").write_text("a new blue circle")
    (root / "img_3.png").write_bytes(_encode(Image.fromarray(_rgb(11))))
    (root / "img_4.png").unlink()
    before = _snapshot(tmp_path, None)
    rc, _, err = _embed(capsys, root, out, tiny_clip_dir, *shard)
    _one_line_error(rc, err, "SOURCE", "changed", "--allow-changed-source")
    assert _snapshot(tmp_path, None) == before  # refused: the store is as it was
    rc, _, err = _embed(capsys, root, out, tiny_clip_dir, *shard, "--allow-changed-source")
    assert rc == 0, err
    assert (out / "shard-00000" / "shard.json").stat().st_mtime_ns == first_shard  # unchanged shard kept
    assert _embed(capsys, root, tmp_path / "fresh", tiny_clip_dir, *shard)[0] == 0
    ids, emb = _store_rows(out)
    fresh_ids, fresh_emb = _store_rows(tmp_path / "fresh")
    assert ids == fresh_ids and len(ids) == len(set(ids)) == 5 and "img_1b.png" in ids and "img_4.png" not in ids
    np.testing.assert_array_equal(emb, fresh_emb)
    # a finished store whose SOURCE then changed: "nothing to do" would hide the new image, so it is refused too
    (root / "img_5.png").write_bytes(_encode(Image.fromarray(_rgb(12))))
    (root / "img_5.txt").write_text("a late star")
    _one_line_error(*_embed(capsys, root, out, tiny_clip_dir, *shard)[::2], "changed")
    assert _embed(capsys, root, out, tiny_clip_dir, *shard, "--allow-changed-source")[0] == 0
    assert len(EmbeddingStore(out)) == 6


def test_a_second_embed_on_a_claimed_store_is_refused(tmp_path, tiny_clip_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = _folder(tmp_path / "src")
    out = tmp_path / "out"
    with claim_dir(out, "embed (the first run)"):
        rc, _, err = _embed(capsys, root, out, tiny_clip_dir)
    _one_line_error(rc, err, "in use by", "embed (the first run)")
    assert sorted(p.name for p in out.iterdir()) == [".eclipse-prior.lock"]
    assert _embed(capsys, root, out, tiny_clip_dir)[0] == 0  # free again once the holder is gone


def test_a_killed_embed_does_not_stay_locked_through_its_surviving_workers(tmp_path):
    """kill -9 of the main process leaves its forked data-loader workers running for a while (blocked on a slow
    source); they must not keep the store claimed, or the rerun would be told the store is in use."""
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import os, signal, time
        from eclipse_prior.outputs import claim_dir
        with claim_dir({str(out)!r}, "embed"):
            child = os.fork()
            if child == 0:  # a worker, still reading its shard
                time.sleep(60)
                os._exit(0)
            print(child, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    proc.wait()
    try:
        assert proc.returncode == -signal.SIGKILL
        os.kill(worker, 0)  # the worker is alive ...
        with claim_dir(out, "the rerun"):  # ... and the store is free
            pass
    finally:
        os.kill(worker, signal.SIGKILL)


def test_full_disk_while_writing_a_shard_leaves_nothing_half_written(tmp_path, tiny_clip_dir, capsys, monkeypatch):
    """ENOSPC on the second shard: one line, exit 2, no partial shard or manifest; the rerun resumes to the same
    store as an uninterrupted run."""
    import eclipse_prior.data.store as store_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "src"
    root.mkdir()
    for i in range(4):
        (root / f"img_{i}.png").write_bytes(_encode(Image.fromarray(_rgb(i))))
        (root / f"img_{i}.txt").write_text(f"a red square {i}")
    real_save, calls = np.save, []

    def save_until_full(file, arr, *a, **kw):
        calls.append(file)
        if len(calls) > 4:  # the first shard's four arrays fit; the disk is full after that
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_save(file, arr, *a, **kw)

    monkeypatch.setattr(store_module.np, "save", save_until_full)
    out = tmp_path / "out"
    rc, _, err = _embed(capsys, root, out, tiny_clip_dir, "--shard-size", "2")
    _one_line_error(rc, err, "no space left")
    monkeypatch.setattr(store_module.np, "save", real_save)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith((".eclipse-prior", ".embed"))) == [
        "shard-00000"
    ]
    assert _embed(capsys, root, out, tiny_clip_dir, "--shard-size", "2")[0] == 0
    assert _embed(capsys, root, tmp_path / "full", tiny_clip_dir, "--shard-size", "2")[0] == 0
    assert EmbeddingStore(out).manifest["shards"] == EmbeddingStore(tmp_path / "full").manifest["shards"]
