"""Experiment trackers (mambaout/trackers.py, fed by the run folder): W&B and MLflow get exactly the rows of
steps.csv and metrics.csv, a resumed run continues their runs without a step twice, and a tracker that fails is one
warning, not the end of the run.

No network: W&B runs offline and its own reader (`wandb leet inspect --json`) reads its run files back; MLflow
writes to a SQLite database.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from helpers import MEASURED_COLUMNS, free_port, read_csv, run_job, train_command
from mambaout import trackers
from mambaout.config import load_config
from mambaout.trainer import train

WANDB = {"tracking.wandb": True, "tracking.wandb_mode": "offline"}


@pytest.fixture(autouse=True)
def offline_home(tmp_path, monkeypatch):
    """W&B's settings, caches and service logs in a fresh home, offline and quiet; MLflow's artifacts (./mlruns for
    a database store) in the test's folder."""
    home = tmp_path / "home"
    for name, value in {"HOME": home, "WANDB_CONFIG_DIR": home / ".config" / "wandb",
                        "WANDB_CACHE_DIR": home / ".cache" / "wandb", "WANDB_DATA_DIR": home / ".local" / "wandb",
                        "WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module: creating its tables takes seconds."""
    pytest.importorskip("mlflow", reason="the MLflow tests need the dev extra")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def run(image_root: Path, out: Path, resume: str = "auto", **settings):
    return train(load_config(None, tiny_overrides(image_root, out, **settings)), resume=resume)


def csv_rows(path: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, {column: value}) per row, empty cells left out, as the trackers get them."""
    return [(int(row["step"]), {k: float(v) for k, v in row.items() if k != "step" and v != ""})
            for row in read_csv(path)]


def columns(path: Path) -> tuple[str, ...]:
    """A CSV log's columns but the step (the trackers' x-axis)."""
    return tuple(column for column in read_csv(path)[0] if column != "step")


def without_measured(rows: list[tuple[int, dict[str, float]]]) -> list[tuple[int, dict[str, float]]]:
    """The rows without the columns that measure the machine (a rerun's rows differ there alone)."""
    return [(step, {k: v for k, v in values.items() if k not in MEASURED_COLUMNS}) for step, values in rows]


def run_ids(out: Path) -> dict[str, str]:
    return json.loads((out / "trackers.json").read_text())


# --- W&B -----------------------------------------------------------------------------------------------------------

def wandb_records(out: Path) -> list[list[dict]]:
    """The records of each W&B run file in the run folder (one per process), oldest first, by W&B's own reader."""
    files = []
    for path in (out / "wandb").glob("offline-run-*/run-*.wandb"):
        printed = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                                 capture_output=True, text=True, check=True).stdout
        files.append([json.loads(line) for line in printed.splitlines()])
    return sorted(files, key=lambda records: next(r["run"]["start_time"] for r in records if r["type"] == "run"))


def wandb_rows(records: list[dict], prefix: str) -> list[tuple[int, dict[str, float]]]:
    """(step, {column: value}) of the history records that hold ``prefix/`` keys."""
    rows = []
    for record in records:
        if record["type"] == "history":
            item = record["history"]["item"]
            values = {k.split("/", 1)[1]: v for k, v in item.items() if k.startswith(prefix + "/")}
            if values:
                rows.append((item["_step"], values))
    return rows


def test_wandb_gets_every_row_of_steps_and_metrics_csv_exactly(image_root, tmp_path):
    pytest.importorskip("wandb", reason="the W&B tests need the dev extra")
    out = tmp_path / "run"
    assert run(image_root, out, **WANDB, **{"train.max_steps": 4}).step == 4

    [records] = wandb_records(out)
    header = next(r["run"] for r in records if r["type"] == "run")
    assert header["run_id"] == run_ids(out)["wandb"] and header["display_name"] == "run"
    config = header["config"]["update"]
    assert config["model"]["name"] == "mambaout_femto" and config["train"]["max_steps"] == 4
    assert config["derived"]["accum_steps"] == 2
    assert wandb_rows(records, "train") == csv_rows(out / "steps.csv")
    assert [step for step, _ in csv_rows(out / "steps.csv")] == [1, 2, 3, 4]
    assert wandb_rows(records, "epoch") == csv_rows(out / "metrics.csv")
    saved = [f["path"] for r in records if r["type"] == "files" for f in r["files"]["files"]]
    assert "manifest.json" in saved
    assert next(r["exit"]["exit_code"] for r in records if r["type"] == "exit") == 0


# --- MLflow --------------------------------------------------------------------------------------------------------

def mlflow_rows(client, run_id: str, prefix: str, columns: tuple[str, ...]) -> list[tuple[int, dict[str, float]]]:
    """(step, {column: value}) from the metric histories of ``prefix/column``; a step logged twice fails."""
    by_step: dict[int, dict[str, float]] = {}
    for column in columns:
        for metric in client.get_metric_history(run_id, f"{prefix}/{column}"):
            values = by_step.setdefault(metric.step, {})
            assert column not in values, f"{prefix}/{column} has step {metric.step} twice"
            values[column] = metric.value
    return sorted(by_step.items())


def test_mlflow_gets_every_row_the_config_and_the_manifest(image_root, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    run(image_root, out, **{"train.max_steps": 4, "tracking.mlflow": True, "tracking.mlflow_uri": mlflow_uri,
                            "tracking.mlflow_experiment": "rows"})

    client = MlflowClient(mlflow_uri)
    found = client.get_run(run_ids(out)["mlflow"])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert client.get_experiment(found.info.experiment_id).name == "rows"
    params = found.data.params
    assert params["model.name"] == "mambaout_femto" and params["train.max_steps"] == "4"
    assert params["derived.accum_steps"] == "2" and params["tracking.mlflow_experiment"] == "rows"
    assert {"config.yaml", "manifest.json"} <= {a.path for a in client.list_artifacts(found.info.run_id)}

    assert mlflow_rows(client, found.info.run_id, "train", columns(out / "steps.csv")) == csv_rows(out / "steps.csv")
    assert mlflow_rows(client, found.info.run_id, "epoch", columns(out / "metrics.csv")) == csv_rows(
        out / "metrics.csv")


# --- resume ---------------------------------------------------------------------------------------------------------

def test_a_resumed_run_continues_both_trackers_runs_without_a_step_twice(image_root, tmp_path, mlflow_uri):
    """A run of 4 steps; the same run again from its step-2 checkpoint (steps 3 and 4 and their evaluation logged
    again: skipped); then the same command with 7 steps. One W&B run id and one MLflow run throughout, every step
    once, the values of steps.csv and metrics.csv (the machine's timings aside: a redone step's are the first's)."""
    pytest.importorskip("wandb", reason="the W&B tests need the dev extra")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    tracking = {**WANDB, "tracking.mlflow": True, "tracking.mlflow_uri": mlflow_uri,
                "tracking.mlflow_experiment": "resumed", "train.checkpoint_every_steps": 2}
    assert run(image_root, out, **tracking, **{"train.max_steps": 4}).step == 4
    first_ids = run_ids(out)
    assert run(image_root, out, str(out / "checkpoints" / "step_00000002.pth"), **tracking,
               **{"train.max_steps": 4}).step == 4
    assert run(image_root, out, **tracking, **{"train.max_steps": 7}).step == 7
    assert run_ids(out) == first_ids

    steps, epochs = csv_rows(out / "steps.csv"), csv_rows(out / "metrics.csv")
    assert [step for step, _ in steps] == list(range(1, 8)) and [step for step, _ in epochs] == [4, 6, 7]

    files = wandb_records(out)
    assert len(files) == 3  # offline, W&B writes a file per process, all of the one run
    assert {r["run"]["run_id"] for records in files for r in records if r["type"] == "run"} == {first_ids["wandb"]}
    history = [record for records in files for record in records]
    assert without_measured(wandb_rows(history, "train")) == without_measured(steps)
    assert without_measured(wandb_rows(history, "epoch")) == without_measured(epochs)

    client = MlflowClient(mlflow_uri)
    [only] = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert only.info.run_id == first_ids["mlflow"] and only.info.status == "FINISHED"
    assert only.data.params["train.max_steps"] == "4"  # params are the first config's; config.yaml the last's
    for prefix, log, rows in (("train", "steps.csv", steps), ("epoch", "metrics.csv", epochs)):
        logged = mlflow_rows(client, only.info.run_id, prefix, columns(out / log))
        assert without_measured(logged) == without_measured(rows), log


def test_an_mlflow_run_id_the_store_does_not_have_starts_a_new_run(tmp_path, mlflow_uri, caplog):
    """tracking.mlflow_uri changed on a resume (a harmless key): the folder's run id is not in the new store."""
    settings = load_config(None, ["tracking.mlflow=true", f"tracking.mlflow_uri={mlflow_uri}",
                                  "tracking.mlflow_experiment=moved"]).tracking
    tracker = trackers.MlflowTracker(settings, tmp_path / "run", {"train": {"seed": 1}}, run_id="elsewhere")
    tracker.close(failed=False)
    assert tracker.run_id != "elsewhere"
    assert tracker.client.get_run(tracker.run_id).data.params == {"train.seed": "1"}
    assert any("run elsewhere of this run folder is not in" in r.getMessage() for r in caplog.records)


# --- failures -------------------------------------------------------------------------------------------------------

def test_trackers_that_cannot_start_warn_once_and_train_py_ends_normally(image_root, tmp_path):
    """MLflow's server down (nothing listens on its port) and W&B online without a login: train.py warns once for
    each, naming the key, trains to the end with its checkpoints and exits 0."""
    pytest.importorskip("wandb", reason="the W&B tests need the dev extra")
    pytest.importorskip("mlflow", reason="the MLflow tests need the dev extra")
    out = tmp_path / "run"
    settings = {"tracking.wandb": True, "tracking.wandb_mode": "online", "tracking.mlflow": True,
                "tracking.mlflow_uri": f"http://127.0.0.1:{free_port()}"}
    status, output = run_job(train_command(1, tiny_overrides(image_root, out, **settings)), tmp_path / "job.log",
                             MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", WANDB_MODE="online")
    assert status == 0, output[-4000:]
    assert output.count("tracking.mlflow (") == 1 and output.count("tracking.wandb (") == 1, output[-4000:]
    assert "tracking.mlflow_uri='http://127.0.0.1:" in output and "tracking.wandb_mode='online'" in output
    assert (out / "last.pth").exists() and len(read_csv(out / "steps.csv")) == 3
    assert not (out / "trackers.json").exists()


def test_a_missing_library_is_one_warning_with_the_extra_to_install(image_root, tmp_path, monkeypatch, caplog):
    for module in ("mlflow.entities", "mlflow.tracking"):  # what the adapter imports: importing them now fails
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "run"
    assert run(image_root, out, **{"tracking.mlflow": True}).step == 3
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and r.getMessage().startswith("tracking.")]
    assert len(warnings) == 1 and warnings[0].startswith("tracking.mlflow (")
    assert "ModuleNotFoundError" in warnings[0] and "[mlflow] extra" in warnings[0]
    assert len(read_csv(out / "steps.csv")) == 3 and (out / "last.pth").exists()


def test_a_tracker_failing_mid_run_is_dropped_after_one_warning(monkeypatch, tmp_path, caplog):
    """A tracker that breaks after it started (a server gone mid-run) gets nothing more, and says so once."""
    calls = []

    class Flaky:
        run_id = "flaky-run"

        def __init__(self, *args) -> None:
            pass

        def log(self, values, step) -> None:
            calls.append(step)
            if step == 2:
                raise ConnectionError("server gone")

        def save_file(self, path) -> None:
            pass

        def close(self, failed) -> None:
            calls.append("closed")

    monkeypatch.setitem(trackers.ADAPTERS, "mlflow", (Flaky, ("mlflow_uri",)))
    opened = trackers.Trackers()
    settings = load_config(None, ["tracking.mlflow=true"]).tracking
    assert opened.start(settings, tmp_path, {}, {"wandb": "kept"}) == {"wandb": "kept", "mlflow": "flaky-run"}
    for step in (1, 2, 3):
        opened.log({"train/loss": 1.0}, step)
    opened.close(failed=False)
    assert calls == [1, 2]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("tracking.mlflow (tracking.mlflow_uri=None) is off for the rest of this run")
    assert warning.endswith("ConnectionError: server gone")
