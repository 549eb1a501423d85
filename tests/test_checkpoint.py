"""Reading, converting and loading weights; each bad file gives one clear CheckpointError."""
import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mambaout import create_model
from mambaout.checkpoint import (
    CheckpointError, load_pretrained, load_training_checkpoint, read_weights_file, save_weights, to_original_layout,
    to_timm_layout)

CONVERT = Path(__file__).resolve().parents[1] / 'scripts' / 'convert_checkpoint.py'


class FileCreatingPayload:
    """Unpickled, it runs ``os.system('touch MARKER')``: the marker file appears if a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(str(self.marker))}',)


@pytest.fixture(scope='module')
def femto_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return create_model('mambaout_femto').state_dict()


@pytest.fixture(scope='module')
def femto_file(tmp_path_factory, femto_state) -> Path:
    path = tmp_path_factory.mktemp('weights') / 'mambaout_femto.pth'
    torch.save(femto_state, path)
    return path


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()  # safetensors files keep no key order
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def checkpoint_error(call, *args, **kwargs) -> str:
    """The message of the CheckpointError raised, which must carry no chained traceback."""
    with pytest.raises(CheckpointError) as info:
        call(*args, **kwargs)
    assert info.value.__suppress_context__ or info.value.__context__ is None
    return str(info.value)


# --- layouts ------------------------------------------------------------------------------------------------------

def test_layout_round_trip_is_exact(femto_state):
    original = to_original_layout(femto_state)
    for key in ('downsample_layers.0.conv1.weight', 'downsample_layers.0.norm2.bias', 'downsample_layers.3.conv.weight',
                'stages.2.8.fc1.weight', 'stages.0.0.conv.bias', 'norm.weight', 'head.fc1.weight',
                'head.norm.weight', 'head.fc2.bias'):
        assert key in original
    assert not any(key.startswith(('stem.', 'head.pre_logits')) or '.blocks.' in key for key in original)

    back = to_timm_layout(original)
    assert list(back) == list(femto_state)
    assert all(back[key] is femto_state[key] for key in femto_state)
    assert list(to_original_layout(original)) == list(original)  # already there: unchanged


def test_rw_variants_have_no_original_layout():
    with torch.device('meta'):
        state = create_model('mambaout_small_rw').state_dict()
    message = checkpoint_error(to_original_layout, state)
    assert 'LayerScale' in message and '_rw' in message and 'timm layout' in message


# --- wrappers and formats -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('wrap, use_ema', [
    (lambda state: {'state_dict': state, 'epoch': 3, 'args': argparse.Namespace(lr=4e-3)}, False),
    (lambda state: {'model': state, 'optimizer': {'step': 10}}, False),
    (lambda state: {'state_dict': {}, 'state_dict_ema': state}, True),
    (lambda state: {'model': {}, 'model_ema': state}, True),
    (lambda state: {f'module.{key}': value for key, value in state.items()}, False),
    (lambda state: {'state_dict_ema': {f'module._orig_mod.{key}': value for key, value in state.items()}}, True),
])
def test_trainer_wrappers_are_unwrapped(tmp_path, femto_state, wrap, use_ema):
    torch.save(wrap(femto_state), tmp_path / 'checkpoint.pth.tar')
    assert_same_weights(read_weights_file(tmp_path / 'checkpoint.pth.tar', use_ema=use_ema), femto_state)


def test_ema_only_when_asked(tmp_path, femto_state):
    zeros = {key: torch.zeros_like(value) for key, value in femto_state.items()}
    torch.save({'state_dict': zeros, 'state_dict_ema': femto_state}, tmp_path / 'both.pth.tar')
    assert_same_weights(read_weights_file(tmp_path / 'both.pth.tar'), zeros)
    assert_same_weights(read_weights_file(tmp_path / 'both.pth.tar', use_ema=True), femto_state)

    torch.save({'state_dict': femto_state, 'epoch': 3}, tmp_path / 'no_ema.pth.tar')
    message = checkpoint_error(read_weights_file, tmp_path / 'no_ema.pth.tar', use_ema=True)
    assert 'no EMA weights' in message and 'state_dict, epoch' in message

    torch.save({'model_ema': femto_state}, tmp_path / 'ema_only.pth.tar')
    assert '--ema' in checkpoint_error(read_weights_file, tmp_path / 'ema_only.pth.tar')


@pytest.mark.parametrize('suffix', ['.pth', '.pth.tar', '.pt', '.bin', '.safetensors'])
@pytest.mark.parametrize('layout', ['timm', 'original'])
def test_file_formats(tmp_path, femto_state, suffix, layout):
    path = tmp_path / f'weights{suffix}'
    save_weights(femto_state, path, layout=layout)
    assert list(tmp_path.iterdir()) == [path]  # no partial file left behind
    assert_same_weights(to_timm_layout(read_weights_file(path)), femto_state)


# --- bad files ----------------------------------------------------------------------------------------------------

def unsafe_file(folder: Path, femto_state) -> tuple[Path, Path]:
    """A file laid out as a training checkpoint (weights, step) with a code-running payload beside the tensors, and
    the payload's marker file."""
    path, marker = folder / 'unsafe.pth', folder / 'code-ran'
    torch.save({'model': femto_state, 'train_state': {'step': 1}, 'hook': FileCreatingPayload(marker)}, path)
    return path, marker


@pytest.mark.parametrize('load', [read_weights_file, lambda path: create_model('mambaout_femto', checkpoint=path),
                                  load_training_checkpoint],
                         ids=['read_weights_file', 'create_model', 'load_training_checkpoint (resume)'])
def test_pickled_code_is_refused_unrun(tmp_path, femto_state, load):
    """A payload that would create a file when unpickled: every loader (weights for a model, a training checkpoint
    to resume) refuses the file naming the pickled global, and the file never appears; a plain unpickling creates
    it (the payload is live)."""
    path, marker = unsafe_file(tmp_path, femto_state)
    message = checkpoint_error(load, path)
    assert not marker.exists()
    assert str(path) in message
    assert 'pickled Python objects beyond tensors' in message and f'{os.system.__module__}.system' in message
    assert 'refused for safety' in message
    assert 'convert_checkpoint.py' in message and '.safetensors' in message
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize('variant', ['mambaout_kobe', 'mambaout_tiny'])
def test_checkpoint_of_another_variant_is_named(femto_file, variant):
    message = checkpoint_error(load_pretrained, create_model(variant), femto_file)
    assert f'does not fit {variant}' in message
    assert 'looks like mambaout_femto (depths 3-3-9-3, dims 48-96-192-288)' in message
    assert len(message.splitlines()) <= 4  # a summary, not a wall of keys


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_truncated_file(tmp_path, femto_state, suffix):
    path = tmp_path / f'weights{suffix}'
    save_weights(femto_state, path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    message = checkpoint_error(read_weights_file, path)
    assert str(path) in message and 'truncated or corrupt' in message and 'fetch it again' in message


def test_missing_file_and_directory(tmp_path):
    assert 'no such file' in checkpoint_error(read_weights_file, tmp_path / 'absent.pth')
    assert 'is a directory' in checkpoint_error(read_weights_file, tmp_path)


# --- loading ------------------------------------------------------------------------------------------------------

def test_other_num_classes_loads_backbone_and_warns(femto_file, femto_state, caplog):
    with caplog.at_level(logging.WARNING, logger='mambaout.checkpoint'):
        model = create_model('mambaout_femto', num_classes=10, checkpoint=femto_file)
    assert 'classifier' in caplog.text and 'fresh' in caplog.text
    assert model.head.fc.out_features == 10
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in femto_state.items() if not key.startswith('head.fc.'))


def test_feature_extractor_loads_backbone(femto_file, femto_state):
    model = create_model('mambaout_femto', features_only=True, checkpoint=femto_file)
    assert torch.equal(model.stages[3].blocks[2].fc2.weight, femto_state['stages.3.blocks.2.fc2.weight'])


def test_non_strict_load_takes_what_fits(femto_file, femto_state, caplog):
    model = create_model('mambaout_kobe')
    with caplog.at_level(logging.WARNING, logger='mambaout.checkpoint'):
        load_pretrained(model, femto_file, strict=False)
    assert 'missing from the checkpoint' in caplog.text
    assert torch.equal(model.stem.conv1.weight, femto_state['stem.conv1.weight'])


def test_timm_model_checkpoints(tmp_path, femto_file):
    torch.manual_seed(0)
    reference = create_model('resnet18')
    torch.save({'state_dict': reference.state_dict()}, tmp_path / 'resnet18.pth.tar')
    model = create_model('resnet18', checkpoint=tmp_path / 'resnet18.pth.tar')
    assert_same_weights(model.state_dict(), reference.state_dict())
    assert 'does not fit resnet18' in checkpoint_error(load_pretrained, model, femto_file)


# --- convert_checkpoint.py ----------------------------------------------------------------------------------------

def convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT), *map(str, args)], capture_output=True, text=True)


def test_convert_cli_round_trip(tmp_path, femto_file, femto_state):
    released = convert(femto_file, tmp_path / 'release.safetensors', '--layout', 'original')
    assert released.returncode == 0, released.stderr
    assert 'mambaout_femto' in released.stdout and 'original layout' in released.stdout
    assert 'downsample_layers.0.conv1.weight' in read_weights_file(tmp_path / 'release.safetensors')

    back = convert(tmp_path / 'release.safetensors', tmp_path / 'back.pth')
    assert back.returncode == 0, back.stderr
    assert_same_weights(read_weights_file(tmp_path / 'back.pth'), femto_state)


def test_convert_cli_bad_input(tmp_path, femto_state):
    missing = convert(tmp_path / 'absent.pth', tmp_path / 'out.pth')
    assert missing.returncode == 2
    assert missing.stderr.count('\n') == 1 and 'no such file' in missing.stderr

    path, marker = unsafe_file(tmp_path, femto_state)
    unsafe = convert(path, tmp_path / 'out.pth')
    assert unsafe.returncode == 2 and 'refused for safety' in unsafe.stderr
    assert not (tmp_path / 'out.pth').exists() and not marker.exists()
