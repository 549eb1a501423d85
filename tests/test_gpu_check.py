"""scripts/gpu_check.sh, the staged GPU checks, where no GPU is (CUDA hidden): the runner cuts a hanging check at
its timeout, with every process it started, and goes on; the quick stage records its GPU checks "skipped: no GPU",
runs its CPU parts and exits 0 well within 2 minutes, leaving only logs and a JSON of every check in --out."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers import REPO, alive, load_script

gpu_check = load_script("gpu_check")
compare_runs = load_script("compare_runs")

# A check that hangs: it starts a child of its own (as torchrun or DataLoader workers do), then sleeps.
HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(child.pid))
print("started", flush=True)
time.sleep(120)
"""


def test_a_hanging_check_is_cut_at_its_timeout_with_its_children_and_the_next_check_runs(tmp_path):
    out, pid_file = tmp_path / "out", tmp_path / "child.pid"
    echoed, checks_in_json = [], []

    def echo(line: str) -> None:  # the summary line, printed as each check ends: the JSON already holds it
        echoed.append(line)
        checks_in_json.append([c["name"] for c in json.loads((out / "gpu_check.json").read_text())["checks"]])

    runner = gpu_check.Runner(out, env=dict(os.environ), gpus=0, echo=echo)
    hang = gpu_check.Check("hang", [sys.executable, "-c", HANG, str(pid_file)], timeout_s=2, expected_s=1, gpus=0)
    after = gpu_check.Check("after", [sys.executable, "-c", "print('rate: 42 img/s'); print('done')"], timeout_s=30,
                            expected_s=1, gpus=0, figures="img/s")
    needs_gpu = gpu_check.Check("needs-gpu", ["false"], timeout_s=30, expected_s=1)
    reads_hang = gpu_check.Check("reads-hang", ["false"], timeout_s=30, expected_s=1, gpus=0, after="hang")
    start = time.monotonic()
    results = [runner.run(check, "test") for check in (hang, after, needs_gpu, reads_hang)]

    assert [r.status for r in results] == ["timeout", "ok", "skipped: no GPU", "skipped: hang did not end ok"]
    assert 2 <= results[0].seconds < 15 and time.monotonic() - start < 30
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:  # killed with its group; reaped by init
        time.sleep(0.1)
    assert not alive(child)
    log = (out / "hang.log").read_text()
    assert "started" in log and "cut at its timeout of 2 s" in log
    assert results[1].figures == "rate: 42 img/s"
    assert checks_in_json == [["hang"], ["hang", "after"], ["hang", "after", "needs-gpu"],
                              ["hang", "after", "needs-gpu", "reads-hang"]]
    assert echoed[0].startswith("[gpu_check] hang: timeout") and "rate: 42 img/s" in echoed[1]
    assert runner.failed
    table = runner.table()
    assert "| hang | test | timeout |" in table and "| needs-gpu | test | skipped: no GPU |" in table


def test_a_check_that_would_start_with_too_little_of_the_budget_left_is_skipped(tmp_path):
    runner = gpu_check.Runner(tmp_path, budget_s=gpu_check.MIN_START_S - 1, env=dict(os.environ), gpus=0,
                              echo=lambda line: None)
    result = runner.run(gpu_check.Check("late", [sys.executable, "-c", "pass"], 30, 1, gpus=0))
    assert result.status == "skipped: out of time" and not runner.failed


def test_the_quick_stage_without_a_gpu_skips_the_gpu_checks_and_runs_the_rest(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    start = time.monotonic()
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert seconds < 120, seconds

    quick = gpu_check.stages(sys.executable, tmp_path)["quick"]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["finished"] and doc["gpus"] == 0
    statuses = {check["name"]: check["status"] for check in doc["checks"]}
    assert list(statuses) == ["environment", *(check.name for check in quick)]
    for check in quick:
        expected = "skipped: no GPU" if check.gpus else "ok"
        assert statuses[check.name] == expected, (check.name, statuses)
        assert re.search(rf"^\| {check.name} \| quick \| {expected} \|", done.stdout, re.MULTILINE), done.stdout
    figures = {check["name"]: check["figures"] for check in doc["checks"]}
    assert "GPUs: 0" in figures["environment"] and figures["cpu-vs-cpu"].endswith("PASS")
    assert any(check.gpus for check in quick) and any(not check.gpus for check in quick)
    # a summary line as each check ends, before the table
    lines = [line for line in done.stdout.splitlines() if line.startswith("[gpu_check] ")]
    assert "[gpu_check] GPUs: none, so the GPU checks are skipped" in lines
    assert [line.split()[1].rstrip(":") for line in lines if "GPUs: none" not in line] == list(statuses)
    # only logs and the JSON come back; the JPEGs and run folders were in a temporary folder, now gone
    assert {p.suffix for p in out.iterdir()} <= {".log", ".json"}
    assert sum(p.stat().st_size for p in out.iterdir()) < 200_000
    jpegs = re.search(r"to (\S+/jpegs)", figures["make-jpegs"]).group(1)
    assert not Path(jpegs).exists()


def test_carried_wheels_import_in_the_checks_without_pip(tmp_path):
    """A package the machine lacks, carried as a wheel (a zip laid out for site-packages): the checks import it."""
    import zipfile

    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / "carried-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("carried/__init__.py", "VERSION = '1.0'\n")
        wheel.writestr("carried-1.0.dist-info/METADATA", "Name: carried\nVersion: 1.0\n")
    env = gpu_check.check_env(tmp_path / "work", tmp_path / "wheels")
    done = subprocess.run([sys.executable, "-c", "import carried, mambaout; print(carried.VERSION)"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "1.0", done.stderr


def test_the_ssm_scan_helper_measures_each_configuration_once(capsys):
    """The full stage's scan check, here on the CPU at a tiny size: one line per configuration, none failed."""
    assert gpu_check.ssm_scan(batch=1, length=32, chunks=(8,), device="cpu") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines if " ms, peak" in line] == ["portable, chunk 8", "unchunked"]


def test_the_resume_comparison_finds_a_single_differing_value():
    weights = {"a": torch.zeros(3), "b": torch.ones(2, dtype=torch.bfloat16)}
    changed = {"a": torch.tensor([0.0, 0.0, 1e-30]), "b": weights["b"].clone()}
    assert compare_runs.differences({"model": weights, "step": 3}, {"model": dict(weights), "step": 3}) == []
    assert compare_runs.differences({"model": weights, "step": 3}, {"model": changed, "step": 4}) == ["/model/a",
                                                                                                       "/step"]
    assert compare_runs.differences({"b": weights["b"]}, {"b": weights["b"].float()}) == ["/b"]  # dtype too
