"""Shapes world: renderer determinism and legibility, grammar round trip, holdout lists, dataset writers."""

from __future__ import annotations

import json
import tarfile
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from eclipse_prior.errors import EclipsePriorError
from eclipse_prior.shapes import (
    CATEGORIES,
    COLOURS,
    DEFAULT_HOLDOUT,
    SHAPES,
    SIZES,
    TEXTURES,
    CaptionError,
    HoldoutError,
    ObjectSpec,
    Scene,
    caption,
    composition,
    generate_examples,
    load_holdout,
    parse_caption,
    parse_holdout_lines,
    render_array,
    sample_scene,
    scene_from_dict,
    write_image_folder,
    write_webdataset,
)
from eclipse_prior.shapes.world import BACKGROUND, render_arrays


def test_same_seed_same_pixels_and_different_seed_differs():
    def draw(seed):
        rng = np.random.default_rng(seed)
        return [render_array(sample_scene(rng, c)) for c in CATEGORIES]

    a, b, c = draw(3), draw(3), draw(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8


def test_parallel_rendering_gives_the_serial_pixels():
    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(600)]
    parallel = render_arrays(scenes, workers=2)  # two chunks of 512 and 88, in two processes
    assert parallel.shape == (600, 64, 64, 3)
    assert np.array_equal(parallel, np.stack([render_array(s) for s in scenes]))


def _single(colour="red", shape="circle", texture="solid", size="big") -> np.ndarray:
    return render_array(Scene((ObjectSpec(colour, shape, texture, size),)))


def test_every_attribute_value_renders_distinctly():
    for values, make in (
        (list(COLOURS), lambda v: _single(colour=v)),
        (list(SHAPES), lambda v: _single(shape=v)),
        (list(TEXTURES), lambda v: _single(texture=v)),
        (list(SIZES), lambda v: _single(size=v)),
    ):
        images = {v: make(v).astype(np.int32) for v in values}
        for u, v in combinations(values, 2):
            diff = np.abs(images[u] - images[v]).sum(axis=-1)
            assert (diff > 60).sum() >= 20, f"{u} and {v} look the same"


@pytest.mark.parametrize("colour", ["white", "black", "yellow"])
def test_objects_stand_out_from_the_grey_background(colour):
    img = _single(colour=colour, size="small").astype(np.int32)
    contrast = np.abs(img - np.array(BACKGROUND)).sum(axis=-1)
    assert (contrast > 150).sum() >= 60  # a small object covers ~180 pixels


def test_two_object_relations_hold_in_geometry():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, "spatial")
        a, b = scene.objects
        dx, dy = b.x - a.x, b.y - a.y
        want = {"left of": dx > abs(dy), "right of": -dx > abs(dy), "above": dy > abs(dx), "below": -dy > abs(dx)}
        assert want[scene.relation]
        assert np.hypot(dx, dy) > a.radius + b.radius  # never overlapping


def test_captions_parse_back_to_their_scene_composition():
    rng = np.random.default_rng(7)
    seen_texts = set()
    for category in CATEGORIES:
        for _ in range(300):
            scene = sample_scene(rng, category)
            text = caption(scene, rng)
            seen_texts.add(text)
            assert parse_caption(text) == composition(scene), text
    assert len(seen_texts) > 1000  # paraphrases, not one fixed string per composition


def test_paraphrases_of_one_relation_share_a_composition():
    texts = [
        "a red circle on the left of a blue star",
        "a photo of a blue star to the right of one red circle",
        "an image of a blue star right of a red circle",
    ]
    assert len({parse_caption(t) for t in texts}) == 1
    assert parse_caption("a red circle larger than a blue star") == parse_caption(
        "a small blue star and a big red circle"
    )


@pytest.mark.parametrize("text", ["a red blob", "a red circle near a star", "red circle", "a red blue circle"])
def test_bad_captions_raise_caption_error(text):
    with pytest.raises(CaptionError):
        parse_caption(text)


def test_holdout_parser_handles_comments_and_relations():
    holdout = parse_holdout_lines(
        ["# held out", "", "orange square  # the classic", "Purple Star", "triangle right of circle"]
    )
    assert holdout.bindings == {("orange", "square"), ("purple", "star")}
    assert holdout.relations == {("circle", "left of", "triangle")}


@pytest.mark.parametrize("line", ["orange", "pink square", "orange blob", "circle near square", "a b c d e"])
def test_holdout_bad_line_is_one_line_error(line, tmp_path):
    path = tmp_path / "holdout.txt"
    path.write_text(f"# ok\norange square\n{line}\n")
    with pytest.raises(HoldoutError) as err:
        load_holdout(path)
    assert isinstance(err.value, EclipsePriorError)
    assert "\n" not in str(err.value) and ":3:" in str(err.value)


def test_default_holdout_is_documented_list():
    assert load_holdout(None) is DEFAULT_HOLDOUT
    assert ("orange", "square") in DEFAULT_HOLDOUT.bindings
    assert len(DEFAULT_HOLDOUT.bindings) == 8 and len(DEFAULT_HOLDOUT.relations) == 2


def test_held_out_compositions_are_never_sampled_when_excluded():
    rng = np.random.default_rng(0)
    for category in CATEGORIES:
        for _ in range(400):
            scene = sample_scene(rng, category, holdout=DEFAULT_HOLDOUT)
            assert not scene.bindings & DEFAULT_HOLDOUT.bindings
            assert not DEFAULT_HOLDOUT.scene_is_held_out(scene)
    for category in CATEGORIES:
        for _ in range(50):
            assert DEFAULT_HOLDOUT.scene_is_held_out(
                sample_scene(rng, category, holdout=DEFAULT_HOLDOUT, only_holdout=True)
            )


def test_dataset_writers_produce_readable_formats(tmp_path):
    examples = list(generate_examples(14, seed=1, holdout=DEFAULT_HOLDOUT))
    folder = write_image_folder(tmp_path / "folder", examples)
    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 14
    for row, ex in zip(rows, examples, strict=True):
        assert row["caption"] == ex.caption
        img = Image.open(folder / row["file"])
        assert img.size == (64, 64) and img.mode == "RGB"
        assert np.array_equal(np.asarray(img), render_array(scene_from_dict(row["scene"])))
        assert parse_caption(row["caption"]).key() == row["composition"]

    shards = write_webdataset(tmp_path / "tars", examples, shard_size=5)
    assert [s.name for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
        assert sorted(names[:3]) == ["00000000.json", "00000000.png", "00000000.txt"]
        assert tar.extractfile("00000000.txt").read().decode() == examples[0].caption
    assert not list((tmp_path / "tars").glob("*.tmp"))
