"""Config loading: presets, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from training.config import config_from_dict, load_config
from training.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.model.latent_size * cfg.model.vae.downsample_factor == cfg.model.resolution


def test_presets_cover_the_design():
    assert {p.stem for p in PRESETS} >= {"tiny", "small", "sd15", "sdxl"}


def test_overrides_are_typed_and_applied_in_order():
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        "train.lr=1e-3", "train.max_steps=7", "train.max_steps=9", "model.unet.block_out_channels=[32, 64, 64]",
        "train.ema.enabled=false", "tracking.run_name=smoke",
    ])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.train.max_steps == 9
    assert cfg.model.unet.block_out_channels == [32, 64, 64]
    assert cfg.train.ema.enabled is False
    assert cfg.tracking.run_name == "smoke"


def test_hash_changes_with_any_value():
    a = load_config(ROOT / "configs/tiny.yaml")
    b = load_config(ROOT / "configs/tiny.yaml", ["train.seed=1"])
    assert a.hash == load_config(ROOT / "configs/tiny.yaml").hash
    assert a.hash != b.hash
    assert a.flat()["train.seed"] == 0 and b.flat()["train.seed"] == 1


@pytest.mark.parametrize("override", ["tracking.run_name=other", "train.log_every=7", "train.max_failures=5",
                                      "train.loader_workers=3", "tracking.experiment=elsewhere",
                                      "tracking.sample_steps=3", "train.checkpoints_to_keep=9"])
def test_hash_ignores_what_does_not_change_training(override):
    tiny = ROOT / "configs/tiny.yaml"
    assert load_config(tiny, [override]).hash == load_config(tiny).hash


@pytest.mark.parametrize("override", ["train.lr=1e-3", "train.max_steps=7", "train.num_workers=1",
                                      "model.resolution=32", "validation.holdout_fraction=0.1"])
def test_hash_follows_what_changes_training(override):
    tiny = ROOT / "configs/tiny.yaml"
    assert load_config(tiny, [override]).hash != load_config(tiny).hash


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=5", "`train.zero_stage` must be 0-3, got 5"),
    ("train.zero_stag=1", "unknown config key `train.zero_stag`"),
    ("train.lr=fast", "`train.lr` must be a number"),
    ("train.max_steps=1.5", "`train.max_steps` must be an integer"),
    ("train.ema.enabled=maybe", "`train.ema.enabled` must be true or false"),
    ("train.precision=fp8", "`train.precision` must be one of fp32, bf16, fp16"),
    ("train.precision=bf16", "`train.precision` is bf16 but `train.use_gpu` is false"),
    ("train.use_gpu=auto", "`train.use_gpu` must be true or false, got 'auto'"),
    ("model.resolution=60", "`model.resolution` must be a multiple of 16"),
    ("model.unet.down_block_types=[DownBlock2D]", "`model.unet.down_block_types` must be a list of 3"),
    ("nonsense", "must look like key=value"),
    ("train.max_steps=[1", "not valid YAML"),
    ("train.lr.x=1", "`lr` is a value, not a section"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(ROOT / "configs/tiny.yaml", [override])
    assert message in str(err.value)


def test_ema_with_zero3_is_refused():
    with pytest.raises(ConfigError, match="train.ema.enabled"):
        config_from_dict({"train": {"zero_stage": 3}})


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not readable YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(scalar)


def test_presets_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/tiny.yaml").name == "tiny"
    assert load_config("sd15").name == "sd15"
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config("configs/nope.yaml")
