import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from mambaout.config import (Config, ConfigError, config_from_dict, derive, describe_schema, diff_configs, load_config,
                             parse_cli, to_yaml)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_no_file_gives_the_schema_defaults():
    assert load_config(None) == Config()


# --- unknown names -------------------------------------------------------------------------------------------------

def test_unknown_key_in_a_file_names_the_file_and_the_closest_keys(tmp_path):
    path = write(tmp_path / "x.yaml", "optim:\n  learning_rate: 0.1\n")
    assert error_of(path).startswith(
        f"{path}: unknown key 'optim.learning_rate'; did you mean 'optim.lr' or 'optim.base_lr'")


def test_unknown_key_suggests_the_same_name_in_another_section():
    assert "did you mean 'sched.epochs'" in error_of(None, ["optim.epochs=3"])


def test_unknown_key_without_a_close_match_lists_the_section():
    message = error_of(None, ["optim.momentum=0.9"])
    assert message.startswith("override 'optim.momentum=0.9': unknown key 'optim.momentum'; valid: optim.global_batch")


def test_unknown_section_in_a_file_and_an_override(tmp_path):
    path = write(tmp_path / "x.yaml", "optimizer:\n  lr: 0.1\n")
    assert error_of(path) == f"{path}: unknown section 'optimizer'; did you mean 'optim'?"
    assert error_of(None, ["schedule.epochs=3"]) == (
        "override 'schedule.epochs=3': unknown section 'schedule'; did you mean 'sched'?")


def test_a_section_must_be_a_mapping(tmp_path):
    path = write(tmp_path / "x.yaml", "optim: 3\n")
    assert error_of(path) == f"{path}: section 'optim': expected a mapping of keys, got 3 (int)"


# --- types and values ----------------------------------------------------------------------------------------------

def test_type_error_in_a_file_names_file_key_expected_and_received(tmp_path):
    path = write(tmp_path / "x.yaml", "train:\n  micro_batch_size: abc\n")
    assert error_of(path) == f"{path}: train.micro_batch_size: expected int, got 'abc' (str)"


def test_type_error_in_an_override():
    assert error_of(None, ["train.micro_batch_size=abc"]) == (
        "override 'train.micro_batch_size=abc': expected int, got 'abc' (str)")


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    path = write(tmp_path / "x.yaml", "optim:\n  base_lr: 1e-3\n  eps: 1E-8\n  betas: [9e-1, 999e-3]\n")
    cfg = load_config(path, ["sched.min_lr=2e-5", "sched.warmup_lr=1.5e-6"])
    assert (cfg.optim.base_lr, cfg.optim.eps, cfg.optim.betas) == (1e-3, 1e-8, (0.9, 0.999))
    assert (cfg.sched.min_lr, cfg.sched.warmup_lr) == (2e-5, 1.5e-6)
    assert yaml.safe_load("x: 1e-3") == {"x": "1e-3"}  # PyYAML's own loader is left as it is


def test_ints_are_floats_but_bools_are_not_numbers():
    cfg = load_config(None, ["optim.weight_decay=0"])
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float
    assert error_of(None, ["train.micro_batch_size=true"]) == (
        "override 'train.micro_batch_size=true': expected int, got True (bool)")
    assert "expected float, got False (bool)" in error_of(None, ["optim.base_lr=false"])
    assert "expected int, got 128.0 (float)" in error_of(None, ["train.micro_batch_size=128.0"])


def test_choices_are_listed():
    assert error_of(None, ["train.precision=fp64"]) == (
        "override 'train.precision=fp64': expected one of 'fp32', 'bf16', 'fp16', got 'fp64' (str)")


@pytest.mark.parametrize("override, expected", [
    ("train.micro_batch_size=0", "expected int > 0, got 0 (int)"),
    ("aug.hflip=1.5", "expected float in [0, 1], got 1.5 (float)"),
    ("optim.lr=-1", "expected float > 0, got -1 (int)"),
    ("aug.crop_scale=[0.5]", "expected list of 2 floats, got [0.5] (list)"),
    ("aug.crop_scale=[0.5, 0.2]", "expected list of 2 floats with 0 < min <= max <= 1, got [0.5, 0.2] (list)"),
    ("data.mean=0.5", "expected list of 3 floats, got 0.5 (float)"),
])
def test_values_out_of_range_are_refused(override, expected):
    assert error_of(None, [override]) == f"override '{override}': {expected}"


# --- inheritance and overrides -------------------------------------------------------------------------------------

def test_base_chain_merges_key_by_key_and_overrides_come_last(tmp_path):
    write(tmp_path / "a.yaml", "optim:\n  weight_decay: 0.1\n  eps: 1e-6\nsched:\n  epochs: 10\n")
    write(tmp_path / "b.yaml", "base: a.yaml\noptim:\n  weight_decay: 0.2\n")
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub" / "c.yaml", "base: ../b.yaml\nsched:\n  warmup_epochs: 2\n")
    cfg = load_config(path, ["sched.epochs=20"])
    assert (cfg.optim.weight_decay, cfg.optim.eps) == (0.2, 1e-6)
    assert (cfg.sched.epochs, cfg.sched.warmup_epochs, cfg.sched.cooldown_epochs) == (20, 2, 10)


def test_an_error_from_a_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "a.yaml", "train:\n  seed: x\n")
    path = write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert error_of(path) == f"{base}: train.seed: expected int, got 'x' (str)"


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    path = write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert "'base:' chain loops" in error_of(path)


def test_missing_base_and_missing_file(tmp_path):
    path = write(tmp_path / "a.yaml", "base: nope.yaml\n")
    assert error_of(path).startswith(f"{path}: base 'nope.yaml' not found")
    assert error_of(tmp_path / "absent.yaml").startswith(f"{tmp_path / 'absent.yaml'}: cannot read config file")


def test_overrides_are_yaml():
    cfg = load_config(None, ["aug.crop_scale=[0.5,1]", "model.checkpoint=w.pth", "model.checkpoint=null",
                             "aug.rand_augment=", "train.output_dir=runs/x"])
    assert cfg.aug.crop_scale == (0.5, 1.0)
    assert cfg.model.checkpoint is None and cfg.aug.rand_augment is None
    assert cfg.train.output_dir == "runs/x"


@pytest.mark.parametrize("override", ["optim.lr", "lr=1", "aug.hflip=[1"])
def test_malformed_overrides(override):
    assert error_of(None, [override]).startswith(f"override '{override}': ")


# --- derived values ------------------------------------------------------------------------------------------------

def test_lr_is_scaled_from_base_lr_unless_set():
    assert derive(load_config(None, ["optim.global_batch_size=2048"]), 1).lr == pytest.approx(2e-3)
    assert derive(load_config(None, ["optim.base_lr=5e-4", "optim.global_batch_size=512"]), 1).lr == 2.5e-4
    assert derive(load_config(None, ["optim.lr=3e-3"]), 1).lr == 3e-3


@pytest.mark.parametrize("num_shards, accum_steps", [(1, 4), (2, 2), (4, 1)])
def test_accumulation_fills_the_global_batch(num_shards, accum_steps):
    cfg = load_config(None, ["optim.global_batch_size=16", "train.micro_batch_size=4"])
    d = derive(cfg, num_shards)
    assert (d.accum_steps, d.micro_batch_size, d.num_shards) == (accum_steps, 4, num_shards)
    assert d.accum_steps * d.micro_batch_size * d.num_shards == 16


def test_a_batch_that_does_not_split_lists_the_valid_choices():
    cfg = load_config(None, ["optim.global_batch_size=16", "train.micro_batch_size=3"])
    with pytest.raises(ConfigError) as info:
        derive(cfg, 2)
    message = str(info.value)
    assert "optim.global_batch_size=16" in message and "train.micro_batch_size=3" in message
    assert "valid train.micro_batch_size for 2 shards: 1, 2, 4, 8;" in message
    assert message.endswith("valid shard counts for train.micro_batch_size=3: none")
    with pytest.raises(ConfigError, match=re.escape("valid shard counts for train.micro_batch_size=4: 1, 2, 4")):
        derive(load_config(None, ["optim.global_batch_size=16", "train.micro_batch_size=4"]), 3)


def test_other_derived_values():
    d = derive(load_config(None, ["data.img_size=192"]), 8)
    assert (d.total_epochs, d.eval_img_size, d.output_dir) == (310, 192, "runs/mambaout_small")
    d = derive(load_config(None, ["eval.img_size=288", "train.output_dir=out"]), 8)
    assert (d.eval_img_size, d.output_dir) == (288, "out")


# --- writing and comparing -----------------------------------------------------------------------------------------

def test_yaml_and_dict_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "mambaout_tiny.yaml", ["optim.lr=2e-3", "aug.rand_augment=null", "train.ema=true"])
    text = to_yaml(cfg, derive(cfg, 8))
    assert list(yaml.safe_load(text)) == [f.name for f in fields(Config)] + ["derived"]
    assert load_config(write(tmp_path / "resolved.yaml", text)) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_derived_values_cannot_be_set():
    assert error_of(None, ["derived.lr=1"]).startswith("override 'derived.lr=1': unknown section 'derived'")


def test_diff_configs():
    a = load_config(None)
    b = load_config(None, ["optim.lr=2e-3", "aug.crop_scale=[0.5, 1]"])
    assert diff_configs(a, b) == [("optim.lr", None, 2e-3), ("aug.crop_scale", [0.08, 1.0], [0.5, 1.0])]
    assert diff_configs(a, load_config(None)) == []


def test_describe_schema_lists_every_key():
    listing = describe_schema()
    for section in fields(Config):
        for f in fields(section.type):
            assert f"| `{section.name}.{f.name}` |" in listing
    assert '| `optim.lr` | float > 0 or null | `null` |' in listing


def test_cli(tmp_path, capsys):
    args, cfg = parse_cli(argparse.ArgumentParser(), ["--config", str(CONFIGS / "mambaout_femto.yaml"), "optim.lr=1"])
    assert (cfg.model.name, cfg.optim.lr, args.print_config) == ("mambaout_femto", 1.0, False)
    with pytest.raises(SystemExit) as info:
        parse_cli(argparse.ArgumentParser(), ["--print-config", "train.seed=7"])
    assert info.value.code == 0 and "  seed: 7\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        parse_cli(argparse.ArgumentParser(), ["train.seed=x"])
    assert info.value.code == 2 and "override 'train.seed=x': expected int" in capsys.readouterr().err


# --- the shipped configs are the published recipe ------------------------------------------------------------------

DROP_PATH = {"femto": 0.025, "kobe": 0.025, "tiny": 0.2, "small": 0.4, "base": 0.6}


@pytest.mark.parametrize("variant", sorted(DROP_PATH))
def test_shipped_config_is_the_published_recipe(variant):
    cfg = load_config(CONFIGS / f"mambaout_{variant}.yaml")
    d = derive(cfg, 8)
    m, o, s, a, t, e = cfg.model, cfg.optim, cfg.sched, cfg.aug, cfg.train, cfg.eval
    assert (m.name, m.drop_path_rate, m.head_dropout) == (f"mambaout_{variant}", DROP_PATH[variant], 0.0)
    assert (cfg.data.img_size, cfg.data.mean, cfg.data.std) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert (o.global_batch_size, d.lr, o.weight_decay, o.eps, o.betas) == (4096, 4e-3, 0.05, 1e-8, (0.9, 0.999))
    assert o.clip_grad is None
    assert (s.epochs, s.warmup_epochs, s.cooldown_epochs, d.total_epochs) == (300, 20, 10, 310)
    assert (s.warmup_lr, s.min_lr, s.per_step) == (1e-6, 1e-5, False)
    assert (a.label_smoothing, a.mixup_alpha, a.cutmix_alpha, a.mixup_prob, a.mixup_switch_prob, a.mixup_mode) == (
        0.1, 0.8, 1.0, 1.0, 0.5, "batch")
    assert a.rand_augment == "rand-m9-mstd0.5-inc1"
    assert (a.random_erase_prob, a.random_erase_mode, a.random_erase_count) == (0.25, "pixel", 1)
    assert (a.crop_scale, a.crop_ratio, a.hflip, a.interpolation) == ((0.08, 1.0), (3 / 4, 4 / 3), 0.5, "random")
    assert (d.eval_img_size, e.crop_pct, e.interpolation, e.every_epochs) == (224, 1.0, "bicubic", 1)
    assert (t.seed, t.ema, e.use_ema, t.precision) == (42, False, False, "fp32")
    assert (d.accum_steps, d.micro_batch_size) == (4, 128)  # the reference: 8 GPUs x 128 x 4


@pytest.mark.parametrize("variant", sorted(DROP_PATH))
def test_variant_configs_add_only_the_model(variant):
    doc = yaml.safe_load((CONFIGS / f"mambaout_{variant}.yaml").read_text())
    model = {"name": f"mambaout_{variant}", "drop_path_rate": DROP_PATH[variant]}
    assert doc == {"base": "_recipe.yaml", "model": model}


def test_config_reference_document_is_in_step_with_the_schemas():
    pytest.importorskip("segmentation_models_pytorch", reason="the fine-tuning schemas need the downstream extra")
    from mambaout.downstream.config import DetectionConfig, SegmentationConfig

    document = (Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md").read_text()
    commands = {"train.py": Config, "scripts/finetune_detection.py": DetectionConfig,
                "scripts/finetune_segmentation.py": SegmentationConfig}
    parts = document.split("\n## ")[1:]
    assert [part.split("\n", 1)[0] for part in parts] == [f"`{command}`" for command in commands]
    for part, (command, schema) in zip(parts, commands.items()):
        assert part.split("\n\n", 1)[1].rstrip("\n") == describe_schema(schema).rstrip("\n"), (
            f"regenerate its part of docs/CONFIG.md: python {command} --help-config")


def test_a_root_schema_gives_its_sections_other_defaults_and_the_same_checks(tmp_path):
    pytest.importorskip("segmentation_models_pytorch", reason="the fine-tuning schemas need the downstream extra")
    from mambaout.downstream.config import DetectionConfig

    cfg = load_config(None, ["optim.weight_decay=0.1"], DetectionConfig)
    assert (cfg.optim.global_batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (16, 1e-4, 0.1)
    assert load_config(None).optim.global_batch_size == 4096  # train.py's schema keeps its own
    assert config_from_dict(cfg.to_dict(), schema=DetectionConfig) == cfg
    with pytest.raises(ConfigError, match="unknown section 'aug'; valid: model, data, optim, sched, train, eval"):
        load_config(None, ["aug.hflip=0.5"], DetectionConfig)
    with pytest.raises(ConfigError, match="model.rpn_proposals: expected list of 2 ints with each > 0"):
        load_config(write(tmp_path / "x.yaml", "model:\n  rpn_proposals: [0, 5]\n"), (), DetectionConfig)
    assert "| `sched.milestones` | list of 2 ints with each > 0 | `[8, 11]` |" in describe_schema(DetectionConfig)


def test_odd_micro_batch_with_mixing_is_refused_at_start():
    cfg = load_config(None, ["optim.global_batch_size=12", "train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match="micro_batch_size=3 must be even with Mixup/CutMix"):
        derive(cfg, 1)
    derive(load_config(None, ["optim.global_batch_size=12", "train.micro_batch_size=3", "aug.mixup_alpha=0",
                              "aug.cutmix_alpha=0"]), 1)
