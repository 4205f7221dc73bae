"""The offline "shapes" world: renderer, caption grammar, held-out lists, dataset writer, small CLIP, judge.

Library entry points (the CLI `eclipse-prior shapes ...` is a thin wrapper):

- ``sample_scene(rng, category, holdout=None, only_holdout=False)`` and ``render(scene, size=64)``;
- ``caption(scene, rng)`` (a random paraphrase) and ``parse_caption(text)`` -> ``Composition``;
- ``load_holdout(path_or_None)`` / ``DEFAULT_HOLDOUT``;
- ``generate_examples``, ``write_image_folder``, ``write_webdataset``;
- ``clip_train.build_clip(out_dir)`` (~35 min on the shared 2-core CPU) and ``judge.build_judge(out_dir)``
  (~32 min) rebuild the shipped ``weights/clip`` and ``weights/judge``; ``judge.load_judge()`` and
  ``judge.judge_scores(images, scenes)`` score images the way T2I-CompBench does.
"""

from eclipse_prior.shapes.captions import (
    CaptionError,
    Composition,
    ObjectDesc,
    caption,
    composition,
    parse_caption,
)
from eclipse_prior.shapes.dataset import Example, generate_examples, write_image_folder, write_webdataset
from eclipse_prior.shapes.holdout import DEFAULT_HOLDOUT, HoldoutError, load_holdout, parse_holdout_lines
from eclipse_prior.shapes.world import (
    CATEGORIES,
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Holdout,
    ObjectSpec,
    Scene,
    render,
    render_array,
    sample_scene,
    scene_from_dict,
    scene_to_dict,
)

__all__ = [
    "CATEGORIES", "COLOURS", "RELATIONS", "SHAPES", "SIZES", "TEXTURES", "DEFAULT_HOLDOUT",
    "CaptionError", "Composition", "Example", "Holdout", "HoldoutError", "ObjectDesc", "ObjectSpec", "Scene",
    "caption", "composition", "generate_examples", "load_holdout", "parse_caption", "parse_holdout_lines",
    "render", "render_array", "sample_scene", "scene_from_dict", "scene_to_dict", "write_image_folder",
    "write_webdataset",
]
