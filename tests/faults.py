"""Faults injected into real training runs, where they arise in practice, to test what the product does about them:

- ``nan-loss``: the loss is NaN, and so are its gradients (a forward pass that overflowed);
- ``nan-loss-value``: the loss reads NaN while its gradients are the true ones: after the gradient all-reduce only
  this rank knows, so only the ranks' agreement can make the others take the same decision;
- ``inf-gradient``: the loss is finite and a gradient is infinite (the last parameter's).

In the test process: ``inject(monkeypatch, fault)``. In ``train.py`` subprocesses, torchrun's workers included:
``env(fault)`` for the job's environment, whose ``sitecustomize`` (``faults_site/``) installs the fault as
train.py starts. The product has no hook for this: the fault replaces ``mambaout.trainer``'s criterion or
model factory, as a test's monkeypatch would. ``env(exit_log=PATH)`` also has every train.py process append its
rank and exit status to PATH (``exit_statuses``): torchrun reports only the workers it saw end before it stopped
the others.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

ENV_VAR = "MAMBAOUT_TEST_FAULT"
EXIT_LOG_VAR = "MAMBAOUT_TEST_EXIT_LOG"
SITE = Path(__file__).resolve().parent / "faults_site"


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str  # nan-loss | nan-loss-value | inf-gradient
    steps: tuple[int, ...]  # the optimizer steps it poisons, counted from 1 (in this process's life)
    accum_steps: int  # micro-batches per optimizer step on one process
    rank: int | None = None  # only on this rank; None: on every process

    def hits(self, micro_batch: int) -> bool:
        """Whether this process's ``micro_batch``-th forward/backward (from 1) is poisoned."""
        on_this_rank = self.rank is None or self.rank == int(os.environ.get("RANK", "0"))
        return on_this_rank and (micro_batch - 1) // self.accum_steps + 1 in self.steps


class _NanValue(torch.autograd.Function):
    """Reads NaN, back-propagates the true loss's gradient."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor) -> torch.Tensor:
        return torch.full_like(loss, math.nan)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def install(fault: Fault, set_attribute: Callable[[Any, str, Any], None] = setattr) -> None:
    import mambaout.trainer as trainer

    if fault.kind == "inf-gradient":
        create_model = trainer.create_model

        def poisoned_model(*args, **kwargs):
            model = create_model(*args, **kwargs)
            backwards = itertools.count(1)
            last = list(model.parameters())[-1]
            last.register_hook(lambda grad: grad + math.inf if fault.hits(next(backwards)) else grad)
            return model

        set_attribute(trainer, "create_model", poisoned_model)
        return
    if fault.kind not in ("nan-loss", "nan-loss-value"):
        raise ValueError(f"unknown fault {fault.kind!r}")
    create_criterion = trainer.create_criterion

    def poisoned_criterion(*args, **kwargs):
        criterion, forwards = create_criterion(*args, **kwargs), itertools.count(1)

        def loss(logits, targets):
            value, hit = criterion(logits, targets), fault.hits(next(forwards))
            if fault.kind == "nan-loss":
                # NaN or 1 (x * 1 is x) as data, every step, so that XLA runs one graph for both; one element, not
                # a 0-d tensor, which torch_xla would bake into the graph as a constant when it is 1
                factor = torch.tensor([math.nan if hit else 1.0]).to(value.device)
                return value * factor[0]
            return _NanValue.apply(value) if hit else value

        return loss

    set_attribute(trainer, "create_criterion", poisoned_criterion)


def inject(monkeypatch, fault: Fault) -> None:
    """The fault in this process's ``train()`` calls, until the test ends."""
    install(fault, monkeypatch.setattr)


def env(fault: Fault | None = None, exit_log: Path | None = None) -> dict[str, str]:
    """Environment variables that install ``fault`` into ``train.py`` subprocesses and have them log their exit
    statuses to ``exit_log``."""
    variables = {"PYTHONPATH": os.pathsep.join([str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if fault is not None:
        variables[ENV_VAR] = json.dumps(dataclasses.asdict(fault))
    if exit_log is not None:
        variables[EXIT_LOG_VAR] = str(exit_log)
    return variables


def exit_statuses(exit_log: Path) -> list[dict[int, int]]:
    """{rank: exit status} of each launch, in launch order (a launch's processes end before the next starts)."""
    launches: list[dict[int, int]] = []
    for line in exit_log.read_text().splitlines():
        rank, status = map(int, line.split())
        if not launches or rank in launches[-1]:
            launches.append({})
        launches[-1][rank] = status
    return launches


def install_from_env() -> None:
    """What ``env`` asked for, in this train.py process."""
    if os.environ.get(ENV_VAR):
        settings = json.loads(os.environ[ENV_VAR])
        install(Fault(**{**settings, "steps": tuple(settings["steps"])}))
    if os.environ.get(EXIT_LOG_VAR):
        exit_now, log = sys.exit, os.environ[EXIT_LOG_VAR]

        def exit_logged(status=None):
            with open(log, "a") as f:  # one short append: lines of concurrent processes stay whole
                code = 0 if status is None else status if isinstance(status, int) else 1  # as Python exits
                f.write(f"{os.environ.get('RANK', '0')} {code}\n")
            exit_now(status)

        sys.exit = exit_logged
