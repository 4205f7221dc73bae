"""Dataclass config: defaults < YAML < flags, and one-line errors for bad values."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from eclipse_prior.config import add_dataclass_arguments, build_config, save_config
from eclipse_prior.errors import ConfigError


@dataclass
class Demo:
    steps: int = 10
    lr: float = 1e-4
    name: str = "run"
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    maybe: int | None = None


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Demo)
    return parser.parse_args(argv)


def test_precedence_defaults_yaml_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 20\nlr: 1\nname: from-yaml\nflag: true\ntags: [x, y]\n")
    cfg = build_config(Demo, _parse(["--name", "from-flag", "--no-flag"]), cfg_file)
    assert cfg == Demo(steps=20, lr=1.0, name="from-flag", mode="a", flag=False, tags=["x", "y"], maybe=None)
    assert isinstance(cfg.lr, float)
    saved = tmp_path / "saved.yaml"
    save_config(cfg, saved)
    assert build_config(Demo, None, saved) == cfg


def test_flags_alone_and_defaults():
    assert build_config(Demo, _parse([])) == Demo()
    assert build_config(Demo, _parse(["--steps", "3", "--mode", "b", "--tags", "p", "q"])) == Demo(
        steps=3, mode="b", tags=["p", "q"]
    )


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("steps: abc\n", "steps must be an integer"),
        ("lr: fast\n", "lr must be a number"),
        ("flag: 3\n", "flag must be true or false"),
        ("mode: c\n", "mode must be one of"),
        ("tags: solo\n", "tags must be a list"),
        ("nope: 1\n", "unknown field(s)"),
        ("- 1\n- 2\n", "must hold a mapping"),
    ],
)
def test_bad_yaml_values_are_one_line_errors(tmp_path, yaml_text, message):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        build_config(Demo, None, cfg_file)
    assert "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(Demo, None, tmp_path / "absent.yaml")


def test_read_json_object_reads_bom_and_words_every_damage_in_one_line(tmp_path):
    """Every model/output JSON file is read through one helper: BOM accepted, each damage a ConfigError naming it."""
    from eclipse_prior.config import read_json_object

    good = tmp_path / "good.json"
    good.write_bytes(b"\xef\xbb\xbf" + json.dumps({"a": 1}).encode())
    assert read_json_object(good, "fix it") == {"a": 1}
    damaged = {"latin1.json": b'{"a": "\xe9"}', "broken.json": b"{ nope", "list.json": b"[1, 2]"}
    words = {"latin1.json": "not UTF-8", "broken.json": "not valid JSON", "list.json": "must hold a JSON object"}
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError) as err:
            read_json_object(tmp_path / name, "fix it")
        message = str(err.value)
        assert name in message and words[name] in message and message.endswith("fix it") and "\n" not in message
