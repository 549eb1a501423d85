"""Model registry: our MambaOut variants by name, any other timm architecture through timm."""
import difflib
import fnmatch
import os

import timm
from torch import nn

from mambaout.checkpoint import load_pretrained
from mambaout.models.mambaout import PRETRAINED_CFGS, VARIANTS, MambaOut

__all__ = ['MambaOut', 'create_model', 'freeze', 'list_models']

# Our override names that timm spells differently.
_TIMM_KWARGS = {'head_dropout': 'drop_rate'}


def list_models(pattern: str | None = None) -> list[str]:
    """Our variant names (originals first, then timm's `_rw` ones), optionally filtered by a shell pattern."""
    return [name for name in VARIANTS if pattern is None or fnmatch.fnmatchcase(name, pattern)]


def create_model(name: str, checkpoint: str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Build a model by name, optionally loading weights from ``checkpoint`` (any layout or wrapper).

    Overrides: ``num_classes``, ``in_chans``, ``drop_path_rate``, ``head_dropout``, ``features_only``,
    ``grad_checkpointing`` and, for MambaOut, any structural ``MambaOut`` argument (``depths``, ``dims``,
    ``expansion_ratio``, ...). A name that is not ours but a timm architecture is built by timm (randomly
    initialised, never downloaded). Unknown names raise a ``ValueError`` listing the closest names.
    """
    grad_checkpointing = overrides.pop('grad_checkpointing', False)
    if name in VARIANTS:
        model = MambaOut(**{**VARIANTS[name], **overrides})
        model.pretrained_cfg = {**PRETRAINED_CFGS[name], 'architecture': name}
    elif timm.is_model(name):
        kwargs = {_TIMM_KWARGS.get(key, key): value for key, value in overrides.items()}
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        known = dict.fromkeys([*VARIANTS, *timm.list_models()])  # ordered, without duplicates
        close = difflib.get_close_matches(name, known, n=5)
        suggestion = f'; did you mean {", ".join(close)}?' if close else ''
        raise ValueError(f'unknown model {name!r}{suggestion} (list_models() gives ours; timm architectures '
                         f'work too)')
    if checkpoint is not None:
        load_pretrained(model, checkpoint)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def freeze(model: nn.Module, part: str) -> None:
    """``model.freeze``: 'backbone' fixes every parameter but those of the classifier's final Linear (linear
    probing; the optimizer then leaves them out); 'none' changes nothing."""
    if part == 'none':
        return
    classifier = {id(param) for param in model.get_classifier().parameters()}
    if not classifier:
        raise ValueError('model.freeze=backbone needs a classifier to train, and this model has none')
    for param in model.parameters():
        param.requires_grad_(id(param) in classifier)
