"""Config errors name the key (and the nearest valid one); missing or empty data paths fail at trainer start."""

from __future__ import annotations

import pytest

from mmdiff.config import ConfigError, load_config
from mmdiff.training.preflight import check_paths


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"data.train_shards={tmp_path}", *overrides])


def test_unknown_key_names_it_and_the_nearest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.max_step'; did you mean 'train\.max_steps'"):
        _cfg(tmp_path, "train.max_step=5")
    (tmp_path / "c.yaml").write_text("model:\n  hiden_size: 8\n")
    with pytest.raises(ConfigError, match=r"'model\.hiden_size'; did you mean 'model\.hidden_size'"):
        load_config(tmp_path / "c.yaml", [f"data.train_shards={tmp_path}"])


def test_wrong_type_and_bad_choices_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"wrong type for config key 'train\.max_steps'"):
        _cfg(tmp_path, "train.max_steps=abc")
    with pytest.raises(ConfigError, match=r"train\.on_nonfinite='ignore'"):
        _cfg(tmp_path, "train.on_nonfinite=ignore")
    with pytest.raises(ConfigError, match=r"train\.resume='sometimes'"):
        _cfg(tmp_path, "train.resume=sometimes")


def test_missing_data_path_and_unmatched_patterns_fail_naming_the_key(tmp_path):
    cases = {
        str(tmp_path / "nowhere"): "not found",
        str(tmp_path / "shard-*.tar"): "no shards match",
        str(tmp_path / "shard-{000000..000003}.tar"): "4 shard",
        str(tmp_path): "no \\*.tar shards in folder",
    }
    for spec, message in cases.items():
        with pytest.raises(ConfigError, match=rf"data\.train_shards=.*{message}"):
            check_paths(load_config(None, [f"data.train_shards={spec}"]))
    with pytest.raises(ConfigError, match="data.train_shards"):  # an empty value is rejected while loading
        check_paths(load_config(None, ["data.train_shards="]))
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"vae\.pretrained_path=.* does not exist"):
        check_paths(load_config(None, [f"data.train_shards={tmp_path}", f"vae.pretrained_path={tmp_path}/vae"]))


def test_train_refuses_a_missing_data_path_before_starting(tmp_path):
    from mmdiff.training.trainer import train

    cfg = load_config(None, [f"data.train_shards={tmp_path}/missing", f"train.output_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match="data.train_shards"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
