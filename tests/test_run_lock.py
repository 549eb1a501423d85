"""One training job per run folder: the lock's rules, and two real train.py on one folder."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from mambaout.tracking import LOCK_FILE, RunFolder, RunInUseError, RunLock

REPO = Path(__file__).resolve().parents[1]


def write_lock(folder: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    """A lock left by another job, last refreshed ``age_s`` ago."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "since": "2024-01-01T00:00:00+0000", "id": "theirs"}))
    touched = time.time() - age_s
    os.utime(path, (touched, touched))
    return path


def read_lock(folder: Path) -> dict:
    return json.loads((folder / LOCK_FILE).read_text())


def finished_pid() -> int:
    """The pid of a process of this host that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_is_taken_in_a_new_folder_and_released_at_the_end(tmp_path):
    folder = tmp_path / "runs" / "new"
    with RunLock(folder, enabled=True) as lock:
        holder = read_lock(folder)
        assert (holder["host"], holder["pid"], holder["id"]) == (socket.gethostname(), os.getpid(), lock.owner["id"])
        assert holder["since"]
        RunFolder(folder, enabled=True)  # the lock alone is not a run: the folder is still new
    assert not folder.exists()  # made for the lock and left empty: nothing remains


def test_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(KeyError), RunLock(tmp_path, enabled=True):
        (tmp_path / "metrics.csv").write_text("step\n")
        raise KeyError("the run failed")
    assert not (tmp_path / LOCK_FILE).exists() and (tmp_path / "metrics.csv").exists()


def test_a_held_lock_refuses_a_second_job_naming_the_holder(tmp_path):
    with RunLock(tmp_path, enabled=True) as first:
        with pytest.raises(RunInUseError) as refused, RunLock(tmp_path, enabled=True):
            pass
        assert read_lock(tmp_path)["id"] == first.owner["id"]
    message = str(refused.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()} since {first.owner['since']}" in message
    assert "train.output_dir=" in message and f"delete {tmp_path / LOCK_FILE}" in message


def test_a_live_process_of_this_host_keeps_its_lock_however_old(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, socket.gethostname(), holder.pid, age_s=10 * RunLock.STALE_S)
        with pytest.raises(RunInUseError, match=f"pid {holder.pid} on host"), RunLock(tmp_path, enabled=True):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_finished_process_of_this_host_is_taken_over(tmp_path, caplog):
    dead = finished_pid()
    write_lock(tmp_path, socket.gethostname(), dead)
    with RunLock(tmp_path, enabled=True) as lock:
        assert read_lock(tmp_path)["id"] == lock.owner["id"]
    assert f"taking over the lock of pid {dead}" in caplog.text and "no longer runs on this host" in caplog.text


def test_lock_of_an_earlier_life_with_this_process_pid_is_taken_over(tmp_path, caplog):
    """A restarted container runs its command under the pid of the last life, which left its lock behind."""
    write_lock(tmp_path, socket.gethostname(), os.getpid())
    with RunLock(tmp_path, enabled=True) as lock:
        assert read_lock(tmp_path)["id"] == lock.owner["id"]
    assert f"its pid {os.getpid()} is this process's now" in caplog.text


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are recognised through /proc")
def test_lock_of_a_killed_but_unreaped_process_is_taken_over(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # ended, left a zombie: kill(pid, 0) still succeeds
    try:
        write_lock(tmp_path, socket.gethostname(), process.pid)
        with RunLock(tmp_path, enabled=True) as lock:
            assert read_lock(tmp_path)["id"] == lock.owner["id"]
    finally:
        process.wait()


def test_lock_of_another_host_is_refused_while_fresh_and_taken_over_when_stale(tmp_path, caplog):
    write_lock(tmp_path, "node-b", 4242, age_s=RunLock.STALE_S - 60)
    refused = "pid 4242 on host node-b since 2024-01-01.*not refreshed for 10 minutes is taken over"
    with pytest.raises(RunInUseError, match=refused), RunLock(tmp_path, enabled=True):
        pass
    assert read_lock(tmp_path)["id"] == "theirs"

    write_lock(tmp_path, "node-b", 4242, age_s=RunLock.STALE_S + 60)
    with RunLock(tmp_path, enabled=True) as lock:
        assert read_lock(tmp_path)["id"] == lock.owner["id"]
    assert "not refreshed for 11 minutes" in caplog.text


def test_holder_refreshes_the_lock_for_other_nodes(tmp_path):
    lock = RunLock(tmp_path, enabled=True)
    lock.REFRESH_S = 0.02
    with lock:
        path = tmp_path / LOCK_FILE
        os.utime(path, (0, 0))
        deadline = time.monotonic() + 10
        while path.stat().st_mtime == 0:
            assert time.monotonic() < deadline, "the lock was not refreshed"
            time.sleep(0.01)


def test_a_lock_taken_over_meanwhile_is_left_to_its_new_holder(tmp_path):
    with RunLock(tmp_path, enabled=True):
        write_lock(tmp_path, "node-b", 4242)  # another node judged ours stale and took the folder
    assert read_lock(tmp_path)["id"] == "theirs"


def test_other_ranks_take_no_lock(tmp_path):
    write_lock(tmp_path, "node-b", 4242)  # even a folder in use: only the main rank looks
    with RunLock(tmp_path / "new", enabled=False), RunLock(tmp_path, enabled=False):
        assert not (tmp_path / "new").exists()
    assert read_lock(tmp_path)["id"] == "theirs"


def test_second_train_py_on_a_folder_in_use_exits_with_status_2(image_root, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "train.py", *tiny_overrides(image_root, out, **{"train.max_steps": 12})]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK_FILE).exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the first run took no lock"
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # it holds the folder while the second starts, however slow the machine
        second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        assert f"train.py: error: train.output_dir '{out}' is in use by another training job, pid {first.pid} " \
               f"on host {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr
        assert "input pipeline" not in second.stderr  # refused at once: no data or model was built
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()
    finally:
        first.kill()
        first.wait()
    for name in ("metrics.csv", "steps.csv"):
        with open(out / name) as f:
            steps = [int(row["step"]) for row in csv.DictReader(f)]
        assert steps and len(steps) == len(set(steps)), name
    assert not (out / LOCK_FILE).exists()
