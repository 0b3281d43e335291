import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from lowcon.config import (ConfigError, first_line, from_dict, list_presets, load_config, parse_overrides, preset_path,
                           save_config)
from lowcon.dehazing import DehazeConfig


@dataclass
class Small:
    lr: float = 1e-4
    steps: int = 10
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    weights: tuple[float, ...] = (1.0, 2.0)
    flag: bool = False


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'lrr'.*valid keys: lr, steps, name, mode, weights, flag"):
        from_dict(Small, {"lrr": 1})


def test_types_are_checked_and_coerced():
    cfg = from_dict(Small, {"lr": 1, "weights": [3, 4], "mode": "b"})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.weights == (3.0, 4.0) and cfg.mode == "b"
    with pytest.raises(ConfigError, match="steps"):
        from_dict(Small, {"steps": "ten"})
    with pytest.raises(ConfigError, match="mode"):
        from_dict(Small, {"mode": "c"})
    with pytest.raises(ConfigError, match="flag"):
        from_dict(Small, {"flag": "yes"})


def test_file_then_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.5\nsteps: 3\n")
    cfg = load_config(Small, path, parse_overrides(["steps=7", "weights=[1, 1]"]))
    assert (cfg.lr, cfg.steps, cfg.weights) == (0.5, 7, (1.0, 1.0))
    assert load_config(Small, path, parse_overrides(["weights=0.5,4"])).weights == (0.5, 4.0)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Small, tmp_path / "saved.yaml") == cfg
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Small, bad)


def test_every_dehaze_preset_loads_and_validates():
    names = [n for n in list_presets() if n.startswith("aecrnet")]
    assert len(names) == 12  # full + 6 Table 2 rows + 4 Table 4 rows + the low-memory one
    cfgs = {n: load_config(DehazeConfig, preset_path(n)) for n in names}
    assert cfgs["aecrnet"].beta == 0.1 and cfgs["aecrnet"].lr == 1e-4 and cfgs["aecrnet"].batch_size == 16
    assert cfgs["aecrnet_t2_base"].variant == "base" and cfgs["aecrnet_t2_base"].beta == 0
    assert cfgs["aecrnet_t2_cr_noneg"].cr_negatives is False
    assert cfgs["aecrnet_t4_1tor"].num_negatives == 10 and cfgs["aecrnet_t4_rtor"].num_positives == 10
    low = cfgs["aecrnet_low_memory"]
    assert low.activation_checkpointing and low.heap_mmap_threshold_mb == 8 and low.winograd_band_mb == 4
    assert dataclasses.replace(low, activation_checkpointing=False, heap_mmap_threshold_mb=0, winograd_band_mb=16,
                               run_dir=cfgs["aecrnet"].run_dir) == cfgs["aecrnet"]


def test_dehaze_config_validation():
    with pytest.raises(ConfigError, match="variant"):
        from_dict(DehazeConfig, {"variant": "nope"})
    with pytest.raises(ConfigError, match="crop"):
        from_dict(DehazeConfig, {"crop": 30})
    with pytest.raises(ConfigError, match="batch_size"):
        from_dict(DehazeConfig, {"num_negatives": 10, "batch_size": 4})


def test_first_line_of_an_error():
    assert first_line(RuntimeError("  size mismatch for w\n\tshape (3,) vs (4,)\n")) == "size mismatch for w"
    # a library error with an empty message still reports something: its type
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(ValueError("\n \n")) == "ValueError"
