"""Checkpoints: reading and converting pretrained weights, and writing and reading training checkpoints.

Weights come as ``.pth``/``.pth.tar``/``.pt``/``.bin`` (torch) or ``.safetensors`` files, either plain state dicts
or wrapped by a trainer (``state_dict``, ``state_dict_ema``, ``model``, ``model_ema``; ``module.`` and
``_orig_mod.`` key prefixes), in the original release's key layout or in timm's (our model's). Torch files are
only ever unpickled with ``weights_only=True``. Every problem surfaces as one ``CheckpointError`` that says which
file, what is wrong and what to do.
"""
import argparse
import errno
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import Tensor, nn

from mambaout.models.mambaout import VARIANTS, MambaOut

__all__ = [
    'CheckpointError', 'read_file', 'read_weights_file', 'unwrap_state_dict', 'detect_layout', 'to_timm_layout',
    'to_original_layout', 'guess_variant', 'load_pretrained', 'load_weights', 'save_weights',
    'save_training_checkpoint', 'load_training_checkpoint',
]

_logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
Layout = Literal['timm', 'original']
StateDict = dict[str, Tensor]


class CheckpointError(Exception):
    """A weights file or state dict that cannot be used; the message says what to do about it."""


# --- reading weight files ----------------------------------------------------------------------------------------

TORCH_SUFFIXES = ('.pth', '.pth.tar', '.pt', '.bin')
SAFETENSORS_SUFFIX = '.safetensors'
HUB_WEIGHTS_FILES = ('model.safetensors', 'pytorch_model.bin')  # a timm hub folder's, by preference
_WEIGHTS_KEYS = ('state_dict', 'model')
_EMA_KEYS = ('state_dict_ema', 'model_ema')
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # (Distributed)DataParallel, torch.compile
# Harmless classes that trainers store next to the weights (timm saves its argparse arguments).
_SAFE_GLOBALS = [argparse.Namespace]


def read_weights_file(path: PathLike, use_ema: bool = False) -> StateDict:
    """Read the weights of a torch or safetensors file as a flat ``{name: tensor}`` dict on the CPU.

    Trainer wrappers and ``module.``/``_orig_mod.`` prefixes are removed; the key layout is left as it is.
    With ``use_ema`` the EMA weights are taken, and their absence is an error.
    """
    return unwrap_state_dict(read_file(path), use_ema=use_ema, source=str(path))


def read_file(path: PathLike) -> object:
    """The content of a torch or safetensors file as stored (a trainer's wrapper stays wrapped), or of the weights
    file of a folder in timm's hub format (an export, a hub snapshot)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'{path}: no such file. Check the path (relative paths start at {Path.cwd()}).')
    if path.is_dir():
        path = _hub_weights_file(path)
    return _read_safetensors(path) if path.name.endswith(SAFETENSORS_SUFFIX) else _read_torch_file(path)


def _hub_weights_file(folder: Path) -> Path:
    found = next((folder / name for name in HUB_WEIGHTS_FILES if (folder / name).is_file()), None)
    if found is None:
        raise CheckpointError(f'{folder} is a directory without {" or ".join(HUB_WEIGHTS_FILES)}: pass the weights '
                              f'file inside it ({", ".join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))}).')
    return found


def _read_safetensors(path: Path) -> StateDict:
    try:
        return load_safetensors(path, device='cpu')
    except SafetensorError as err:
        raise CheckpointError(_damaged_file_message(path, 'safetensors', err)) from None


def _read_torch_file(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # a damaged file fails in many ways: OSError, EOFError, KeyError, RuntimeError...
        # torch names the refused global as 'Unsupported global: GLOBAL mod.name' or, for a blocked module
        # (os, posix, subprocess...), 'unsupported GLOBAL mod.name whose module mod is blocked'
        refused = re.search(r'[Uu]nsupported (?:global: )?GLOBAL (\S+)', str(err))
        if refused:
            raise CheckpointError(
                f'{path}: refused for safety: the file contains pickled Python objects beyond tensors '
                f'({refused.group(1)}), and unpickling them can run arbitrary code. If you trust the file, '
                f'extract its weights in a trusted environment with `python scripts/convert_checkpoint.py {path} '
                f'weights.safetensors --trust-pickle`, or ask its author for a .safetensors file.') from None
        raise CheckpointError(_damaged_file_message(path, 'PyTorch', err)) from None


def _damaged_file_message(path: Path, file_format: str, err: Exception) -> str:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else 'unexpected end of data'
    return (f'{path}: cannot be read as a {file_format} weights file ({type(err).__name__}: {detail}). '
            f'It is probably truncated or corrupt, e.g. by an interrupted download or copy: fetch it again.')


def unwrap_state_dict(checkpoint: object, use_ema: bool = False, source: str = 'checkpoint') -> StateDict:
    """The weights inside a loaded checkpoint: a plain state dict or a trainer's wrapper around one."""
    weights = _find_weights(checkpoint, use_ema, source)
    return {_strip_wrapper_prefixes(key): value for key, value in weights.items()}


def _find_weights(checkpoint: object, use_ema: bool, source: str) -> Mapping:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{source}: holds a {type(checkpoint).__name__}, not a dict of weights. '
                              f'Save the state_dict() of the model instead.')
    wanted = _EMA_KEYS if use_ema else _WEIGHTS_KEYS
    key = next((key for key in wanted if key in checkpoint), None)
    if key is None and use_ema:
        raise CheckpointError(f'{source}: has no EMA weights (no {" or ".join(_EMA_KEYS)}; '
                              f'{_describe_contents(checkpoint)}). Load its regular weights: drop use_ema / --ema.')
    weights = checkpoint if key is None else checkpoint[key]
    if isinstance(weights, Mapping) and weights and _holds_only_tensors(weights):
        return weights
    hint = ' It holds EMA weights: load those with use_ema=True / --ema.' if set(_EMA_KEYS) & set(checkpoint) else ''
    raise CheckpointError(f'{source}: found no weights (expected tensors at the top level or under '
                          f'{" or ".join(wanted)}; {_describe_contents(checkpoint)}).{hint}')


def _holds_only_tensors(mapping: Mapping) -> bool:
    return all(isinstance(value, Tensor) for value in mapping.values())


def _describe_contents(checkpoint: Mapping) -> str:
    if _holds_only_tensors(checkpoint):
        return f'a plain state dict of {len(checkpoint)} tensors'
    return f'top-level keys: {_preview(list(checkpoint))}'


def _strip_wrapper_prefixes(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split('.', 1)[1]
    return key


def _preview(items: list, limit: int = 5) -> str:
    shown = ', '.join(str(item) for item in items[:limit])
    return f'{shown}, ... ({len(items)} in all)' if len(items) > limit else shown or 'none'


# --- key layouts --------------------------------------------------------------------------------------------------

# Original release prefix -> timm prefix, one to one; {n}, {s}, {b}: downsample, stage and block indices.
# The first matching rule renames a key, so the order matters (downsample_layers.0 is the stem).
_LAYOUT_RENAMES = (
    ('downsample_layers.0.', 'stem.'),
    ('downsample_layers.{n}.', 'stages.{n}.downsample.'),
    ('stages.{s}.{b}.', 'stages.{s}.blocks.{b}.'),
    ('norm.', 'head.norm.'),
    ('head.fc1.', 'head.pre_logits.fc.'),
    ('head.norm.', 'head.pre_logits.norm.'),
    ('head.fc2.', 'head.fc.'),
)


def _compile(renames) -> list[tuple[re.Pattern, str]]:
    """(source template, target template) pairs -> (regex matching the source, target template)."""
    return [(re.compile(re.sub(r'\\{(\w)\\}', r'(?P<\1>\\d+)', re.escape(source))), target)
            for source, target in renames]


_TO_TIMM = _compile(_LAYOUT_RENAMES)
_TO_ORIGINAL = _compile((timm, original) for original, timm in _LAYOUT_RENAMES)


def _rename(state_dict: Mapping[str, Tensor], rules: list[tuple[re.Pattern, str]]) -> StateDict:
    renamed = {}
    for key, value in state_dict.items():
        for pattern, target in rules:
            match = pattern.match(key)
            if match:
                key = target.format(**match.groupdict()) + key[match.end():]
                break
        renamed[key] = value
    return renamed


def detect_layout(state_dict: Mapping[str, Tensor]) -> Layout | None:
    """'original' (the paper's release), 'timm' (ours and the hub's), or None for other models' weights."""
    if any(key.startswith('downsample_layers.0.') for key in state_dict):
        return 'original'
    if any(key.startswith('stem.') for key in state_dict):
        return 'timm'
    return None


def to_timm_layout(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Rename original-release keys to timm's (our model's); other state dicts come back unchanged."""
    if detect_layout(state_dict) != 'original':
        return dict(state_dict)
    return _rename(state_dict, _TO_TIMM)


def to_original_layout(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Rename timm-layout keys to the original release's; only the paper's five architectures have one."""
    layout = detect_layout(state_dict)
    if layout == 'original':
        return dict(state_dict)
    if layout is None:
        raise CheckpointError('not MambaOut weights (no stem.* or downsample_layers.0.* keys): they have no '
                              'original MambaOut layout. Keep them in the timm layout.')
    extras = _beyond_original_architecture(state_dict)
    if extras:
        raise CheckpointError(f'these weights have {", ".join(extras)}, like timm\'s `_rw` variants, which the '
                              f'original MambaOut code cannot hold: keep them in the timm layout.')
    return _rename(state_dict, _TO_ORIGINAL)


def _beyond_original_architecture(state_dict: Mapping[str, Tensor]) -> list[str]:
    extras = []
    if any(key.endswith('.ls.gamma') for key in state_dict):
        extras.append('LayerScale')
    if 'stem.norm1.weight' not in state_dict:
        extras.append('a stem without its middle LayerNorm')
    if 'head.norm.weight' in state_dict and 'head.pre_logits.norm.weight' not in state_dict:
        extras.append('a head without its hidden LayerNorm')
    return extras


# --- recognising a variant ----------------------------------------------------------------------------------------

_BLOCK_NORM = re.compile(r'stages\.(\d+)\.blocks\.\d+\.norm\.weight')


def _structure(state_dict: Mapping[str, Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(depths, dims) of timm-layout MambaOut weights, or None for other weights."""
    depths, dims = {}, {}
    for key, value in state_dict.items():
        if match := _BLOCK_NORM.fullmatch(key):
            stage = int(match[1])
            depths[stage] = depths.get(stage, 0) + 1
            dims[stage] = value.shape[0]
    if not depths:
        return None
    stages = sorted(depths)
    return tuple(depths[stage] for stage in stages), tuple(dims[stage] for stage in stages)


def _describe(structure: tuple[tuple[int, ...], tuple[int, ...]]) -> str:
    depths, dims = structure
    return f'depths {"-".join(map(str, depths))}, dims {"-".join(map(str, dims))}'


def _backbone_shapes(state_dict: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items() if not key.startswith('head.')}


def guess_variant(state_dict: Mapping[str, Tensor]) -> str | None:
    """The variant whose backbone has exactly these weight names and shapes (any layout), or None."""
    state_dict = to_timm_layout(state_dict)
    structure = _structure(state_dict)
    shapes = _backbone_shapes(state_dict)
    for name, settings in VARIANTS.items():
        if (tuple(settings['depths']), tuple(settings['dims'])) != structure:
            continue
        with torch.device('meta'):  # shapes only: no memory, no init cost
            reference = MambaOut(**settings)
        if _backbone_shapes(reference.state_dict()) == shapes:
            return name
    return None


# --- loading into a model -----------------------------------------------------------------------------------------

@dataclass
class _KeyDiff:
    """How a state dict differs from what a model expects."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    reshaped: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # key: (checkpoint, model) shapes

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.reshaped)

    def split(self, prefixes: tuple[str, ...]) -> tuple['_KeyDiff', '_KeyDiff']:
        """(the differences under these key prefixes, the others)."""
        def part(inside: bool) -> _KeyDiff:
            return _KeyDiff([key for key in self.missing if key.startswith(prefixes) == inside],
                            [key for key in self.unexpected if key.startswith(prefixes) == inside],
                            {key: shapes for key, shapes in self.reshaped.items()
                             if key.startswith(prefixes) == inside})
        return part(True), part(False)

    def summary(self) -> str:
        lines = []
        if self.missing:
            lines.append(f'missing from the checkpoint: {_preview(self.missing, 3)}')
        if self.unexpected:
            lines.append(f'not in the model: {_preview(self.unexpected, 3)}')
        if self.reshaped:
            shown = [f'{key} {list(saved)} vs model {list(expected)}'
                     for key, (saved, expected) in self.reshaped.items()]
            lines.append(f'different shapes: {_preview(shown, 3)}')
        return '\n'.join(f'  {line}' for line in lines)


def _compare(model_state: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]) -> _KeyDiff:
    return _KeyDiff(
        missing=[key for key in model_state if key not in state_dict],
        unexpected=[key for key in state_dict if key not in model_state],
        reshaped={key: (tuple(value.shape), tuple(model_state[key].shape)) for key, value in state_dict.items()
                  if key in model_state and value.shape != model_state[key].shape},
    )


def load_pretrained(model: nn.Module, path: PathLike, use_ema: bool = False, strict: bool = True) -> None:
    """Load a weights file into ``model``; see ``load_weights``."""
    load_weights(model, read_weights_file(path, use_ema=use_ema), strict=strict, source=str(path))


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True,
                 source: str = 'state dict') -> None:
    """Load weights of either layout into ``model``, checking names and shapes first.

    A classifier of another size (or none) is not an error: the rest loads and the classifier keeps its fresh
    initialisation, as for fine-tuning. Any other difference raises a ``CheckpointError`` that says which
    variant the weights look like, or with ``strict=False`` is logged while the matching tensors load.
    """
    if isinstance(model, MambaOut):
        state_dict = to_timm_layout(state_dict)
        if model.features_only:  # a feature extractor has no head to load
            state_dict = {key: value for key, value in state_dict.items() if not key.startswith('head.')}
    model_state = model.state_dict()
    classifier, rest = _compare(model_state, state_dict).split(_classifier_prefixes(model))
    if rest and strict:
        raise CheckpointError(_mismatch_message(model, state_dict, rest, source))
    if rest:
        _logger.warning('%s: loading only the tensors that fit %s:\n%s', source, _model_name(model), rest.summary())
    if classifier:
        _logger.warning('%s: the classifier differs from the model\'s (fine-tuning?); it keeps its fresh '
                        'initialisation, everything else is loaded:\n%s', source, classifier.summary())
    model.load_state_dict({key: value for key, value in state_dict.items()
                           if key in model_state and value.shape == model_state[key].shape}, strict=False)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, 'pretrained_cfg', {}).get('classifier') or ()
    return tuple(f'{name}.' for name in ((classifier,) if isinstance(classifier, str) else classifier))


def _model_name(model: nn.Module) -> str:
    return getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__


def _mismatch_message(model: nn.Module, state_dict: Mapping[str, Tensor], diff: _KeyDiff, source: str) -> str:
    name = _model_name(model)
    if not isinstance(model, MambaOut):
        return f'{source} does not fit {name}; load weights saved from {name}.\n{diff.summary()}'
    target = f'{name} ({_describe(_structure(model.state_dict()))})'
    structure = _structure(state_dict)
    variant = guess_variant(state_dict)
    if variant:
        verdict = (f'it looks like {variant} ({_describe(structure)}). Create the model as {variant}, '
                   f'or load a {name} checkpoint')
    elif structure:
        verdict = (f'its {_describe(structure)} match no known variant. Create the model with the settings '
                   f'it was trained with, or load a {name} checkpoint')
    else:
        verdict = f'it does not look like MambaOut weights. Load a {name} checkpoint'
    return f'{source} does not fit {target}: {verdict}.\n{diff.summary()}'


# --- writing weights ----------------------------------------------------------------------------------------------

def save_weights(state_dict: Mapping[str, Tensor], path: PathLike, layout: Layout = 'timm') -> None:
    """Write weights in the given key layout, as safetensors or torch file by the extension of ``path``.

    The file appears complete or not at all (written next to it, then renamed).
    """
    if layout not in ('timm', 'original'):
        raise ValueError(f"layout must be 'timm' or 'original', got {layout!r}")
    path = Path(path)
    if not path.name.endswith((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)):
        raise CheckpointError(f'{path}: unknown weights extension; use one of '
                              f'{", ".join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))}.')
    converted = to_original_layout(state_dict) if layout == 'original' else to_timm_layout(state_dict)
    partial = path.with_name(f'.{path.name}.partial')
    if path.name.endswith(SAFETENSORS_SUFFIX):
        save_safetensors({key: value.contiguous() for key, value in converted.items()}, partial)
    else:
        torch.save(converted, partial)
    os.replace(partial, path)


# --- training checkpoints -----------------------------------------------------------------------------
# A training checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
# ``weights_only=True`` like any weights file. Writes go to a temporary file that is fsynced and renamed over
# the target: a kill at any moment leaves either the old or the new file, never a torn one.

TRAINING_CHECKPOINT_VERSION = 1


def save_training_checkpoint(state: dict, path: PathLike) -> None:
    """Atomically writes ``state`` to ``path`` (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save({'format_version': TRAINING_CHECKPOINT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:  # full disk (OSError, or torch's RuntimeError), Ctrl-C: no debris left
        tmp.unlink(missing_ok=True)
        if not isinstance(error, (OSError, RuntimeError)):
            raise
        raise CheckpointError(
            f'could not write checkpoint {path}: {_write_failure(error)}. The previous checkpoint is intact. Free '
            'disk space, raise the quota or the file-size limit (ulimit -f), or point train.output_dir at a larger '
            'disk, and resume.') from error


# How storage refuses a write: no space left, the process's file-size limit (RLIMIT_FSIZE), the disk quota.
_REFUSED_WRITE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def _write_failure(error: BaseException) -> str:
    """Why a checkpoint write failed, in words. torch's zip writer reports a refused write as a short one
    ("enforce fail at inline_container.cc ... unexpected pos"), with the OSError as its context."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _REFUSED_WRITE:
            return f'the disk refused the write ({cause.strerror})'
        cause = cause.__cause__ or cause.__context__
    if 'unexpected pos' in str(error):
        return 'the disk refused the write (it stopped short)'
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def load_training_checkpoint(path: PathLike) -> dict:
    """Reads a checkpoint written by ``save_training_checkpoint`` (refusing anything else)."""
    state = read_file(path)
    if not isinstance(state, dict) or 'train_state' not in state:
        raise CheckpointError(f'{path} is a weights file, not a training checkpoint of this project: '
                              'it cannot be resumed (use it as model.checkpoint to start a new run from it)')
    return state


def _fsync_dir(folder: Path) -> None:
    """Makes the rename itself durable (POSIX needs the directory entry flushed)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointFolder:
    """The checkpoints of a run: ``checkpoints/step_XXXXXXXX.pth`` (the newest ``keep`` are kept), with
    ``last.pth`` and ``best.pth`` beside them as hard links to the files they designate (no second write)."""

    def __init__(self, path: PathLike, keep: int = 3) -> None:
        self.path = Path(path)
        self.steps_dir = self.path / 'checkpoints'
        self.keep = keep

    def save(self, state: dict, step: int, is_best: bool = False) -> Path:
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        target = self.steps_dir / f'step_{step:08d}.pth'
        save_training_checkpoint(state, target)
        _link_atomically(target, self.path / 'last.pth')
        if is_best:
            _link_atomically(target, self.path / 'best.pth')
        for old in self._step_files()[:-self.keep]:
            old.unlink(missing_ok=True)
        return target

    def set_aside_after(self, step: int) -> None:
        """Renames step files newer than ``step`` (``.abandoned``): resuming from an older checkpoint must not
        later pick up the future it replaces."""
        for newer in self._step_files():
            if int(newer.stem.split('_')[1]) > step:
                newer.rename(newer.with_name(newer.name + '.abandoned'))

    def latest(self) -> Path | None:
        last = self.path / 'last.pth'
        return last if last.exists() else None

    def load_latest(self) -> dict | None:
        """The newest checkpoint that reads back whole (a damaged one is reported and passed over).

        Step files come first: a kill between writing one and linking ``last.pth`` leaves it the newest."""
        for candidate in [*reversed(self._step_files()), self.path / 'last.pth']:
            if not candidate.exists():
                continue
            try:
                return load_training_checkpoint(candidate)
            except CheckpointError as error:
                _logger.warning('passing over an unreadable checkpoint: %s', error)
        return None

    def _step_files(self) -> list[Path]:
        return sorted(self.steps_dir.glob('step_*.pth'))


def _link_atomically(source: Path, link: Path) -> None:
    """``link`` becomes another name of ``source`` in one rename (a copy where hard links are unsupported)."""
    tmp = link.with_name(f'.{link.name}.tmp-{os.getpid()}')
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, link)
