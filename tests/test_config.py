from __future__ import annotations

import json

import pytest

from sae_cxr.config import ConfigError, RunConfig


def test_round_trip_through_json(tmp_path):
    cfg = RunConfig(name="x", seed=3)
    cfg.data.phantom.shortcut = "et_tube:Edema:0.8"
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg.to_dict()))
    back = RunConfig.load(p)
    assert back == cfg


def test_unknown_keys_are_named(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"data": {"sorce": "folder"}}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['sorce'\] in config section c.json.data"):
        RunConfig.load(p)


def test_toml_and_nested_validation(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('name = "t"\n[data]\nsource = "phantom"\n[data.phantom]\nn = 0\n')
    with pytest.raises(ConfigError, match="at least one image"):
        RunConfig.load(p)


def test_a_partial_section_keeps_the_parents_defaults(tmp_path):
    # The transcoder stage trains with its own TrainConfig (not TrainConfig()); a TOML that sets only the
    # learning rate must keep that stage's epochs and input reconstruction, not fall back to the class's.
    stage_train = RunConfig().transcoders.train
    p = tmp_path / "c.toml"
    p.write_text("[transcoders.train]\nlr = 0.002\n")
    train = RunConfig.load(p).transcoders.train
    assert train.lr == 0.002
    assert (train.epochs, train.input_reconstruction) == (stage_train.epochs, stage_train.input_reconstruction)
    assert train.input_reconstruction != type(train)().input_reconstruction  # the case that used to break
    p.write_text("[transcoders.train]\nlrr = 0.002\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\]"):
        RunConfig.load(p)
