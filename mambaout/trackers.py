"""Experiment trackers: Weights & Biases and MLflow, fed by the run folder (``tracking.RunFolder``) with what it
records: the resolved config, the manifest, and every steps.csv and metrics.csv row.

Each adapter is a thin layer over its library, opened only where its ``tracking.*`` key asks for it. A tracker is
never worth a run: one that fails (library missing, no login, a bad URI, its server down) warns once, naming its key,
and is dropped for the rest of the run, which goes on.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Protocol

from .config import TrackingConfig

log = logging.getLogger("mambaout")


class Tracker(Protocol):
    run_id: str  # kept in the run folder: a resume continues this run

    def log(self, values: dict[str, float], step: int) -> None: ...

    def save_file(self, path: Path) -> None: ...

    def close(self, failed: bool) -> None: ...


class WandbTracker:
    """A W&B run named after the run folder, its files under ``<run folder>/wandb``."""

    def __init__(self, settings: TrackingConfig, folder: Path, config: dict[str, Any],
                 run_id: str | None) -> None:
        import wandb

        # resume="allow" continues the run of that id where it exists; offline, W&B writes a new file per process,
        # which `wandb sync` uploads as the one run. "create_new": never hand back a run another call left open.
        self.run = wandb.init(project=settings.wandb_project, entity=settings.wandb_entity,
                              mode=None if settings.wandb_mode == "auto" else settings.wandb_mode,
                              name=folder.name, id=run_id, resume="allow", dir=folder, config=config,
                              reinit="create_new")
        self.run_id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def save_file(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """An MLflow run named after the run folder in experiment ``tracking.mlflow_experiment``: the config as
    params (when the run is created) and as ``config.yaml``, the manifest and the rows as metrics."""

    def __init__(self, settings: TrackingConfig, folder: Path, config: dict[str, Any],
                 run_id: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(settings.mlflow_uri)
        self.run_id = self._continued(run_id) or self._created(settings.mlflow_experiment, folder.name)
        if self.run_id != run_id:  # params are write-once: a resume's changed harmless keys go in config.yaml only
            self.client.log_batch(self.run_id, params=[Param(key, str(value)) for key, value in _flat(config)])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def _continued(self, run_id: str | None) -> str | None:
        """``run_id``, set running again, where this tracking store has it."""
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("tracking.mlflow: run %s of this run folder is not in %s; logging to a new run",
                        run_id, self.client.tracking_uri)
            return None
        return run_id

    def _created(self, experiment: str, name: str) -> str:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        return self.client.create_run(experiment_id, run_name=name).info.run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now_ms, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def save_file(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


# name: (adapter, the keys to name when it fails, besides tracking.<name>)
ADAPTERS = {
    "wandb": (WandbTracker, ("wandb_project", "wandb_entity", "wandb_mode")),
    "mlflow": (MlflowTracker, ("mlflow_uri", "mlflow_experiment")),
}
INSTALL_HINT = "pip install {name}, or this project's [{name}] extra"


class Trackers:
    """The trackers a run's ``tracking`` section enables, each behind the same guard: its first failure is a
    warning and the end of that tracker."""

    def __init__(self) -> None:
        self._open: dict[str, Tracker] = {}
        self._where: dict[str, str] = {}

    def start(self, settings: TrackingConfig, folder: Path, config: dict[str, Any], run_ids: dict[str, str]
              ) -> dict[str, str]:
        """Opens the enabled trackers, each continuing its run of ``run_ids`` (from the run folder); returns the
        run ids to keep there."""
        for name, (adapter, keys) in ADAPTERS.items():
            if not getattr(settings, name):
                continue
            self._where[name] = ", ".join(f"tracking.{key}={getattr(settings, key)!r}" for key in keys)
            try:
                self._open[name] = adapter(settings, folder, config, run_ids.get(name))
            except Exception as error:  # noqa: BLE001 (any failure of a tracker's library, login, store or server)
                self._drop(name, error)
        return {**run_ids, **{name: tracker.run_id for name, tracker in self._open.items()}}

    def log(self, values: dict[str, float], step: int) -> None:
        self._each(lambda tracker: tracker.log(values, step))

    def save_file(self, path: Path) -> None:
        self._each(lambda tracker: tracker.save_file(path))

    def close(self, failed: bool) -> None:
        self._each(lambda tracker: tracker.close(failed))
        self._open.clear()

    def _each(self, call) -> None:
        for name, tracker in list(self._open.items()):
            try:
                call(tracker)
            except Exception as error:  # noqa: BLE001 (as in start)
                self._drop(name, error)

    def _drop(self, name: str, error: Exception) -> None:
        self._open.pop(name, None)
        hint = f" ({INSTALL_HINT.format(name=name)})" if isinstance(error, ImportError) else ""
        log.warning("tracking.%s (%s) is off for the rest of this run, which goes on (steps.csv and metrics.csv keep "
                    "every row): %s: %s%s", name, self._where[name], type(error).__name__, error, hint)


def _flat(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """``{section: {key: value}}`` as ``[("section.key", value), ...]``."""
    return [(f"{section}.{key}", value) for section, body in config.items() for key, value in body.items()]
