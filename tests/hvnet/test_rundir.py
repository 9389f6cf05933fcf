"""Run directories: clean-up kills only what the run recorded, proven by start time."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from hvnet.rundir import RunDir, all_runs, alive, start_time


def test_clean_kills_recorded_processes_and_spares_a_reused_pid(tmp_path):
    run = RunDir("t", tmp_path)
    run.create()
    mine = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        run.record_process(mine.pid, "guest driver")
        # 'other' stands for a process that got a recorded pid after a crash: same pid
        # in the record, but another start time, so it must be left alone.
        procs = json.loads((run.path / "processes.json").read_text())
        procs.append({"pid": other.pid, "start": start_time(other.pid) - 1, "what": "stale"})
        (run.path / "processes.json").write_text(json.dumps(procs))
        done = run.clean()
        assert f"killed guest driver {mine.pid}" in done
        assert mine.wait(5) == -9
        time.sleep(0.1)
        assert other.poll() is None and alive(other.pid, start_time(other.pid))
        assert not run.path.exists()
    finally:
        for p in (mine, other):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_live_daemon_is_not_cleaned_without_force(tmp_path):
    run = RunDir("live", tmp_path)
    run.create()
    p = subprocess.Popen(["sleep", "60"])
    try:
        run.write_info(pid=p.pid, start=start_time(p.pid))
        assert [r.name for r in all_runs(tmp_path)] == ["live"] and run.daemon_alive()
        with pytest.raises(RuntimeError, match="is running"):
            run.clean()
        with pytest.raises(FileExistsError, match="already up"):
            RunDir("live", tmp_path).create()
        assert "killed daemon" in run.clean(kill_daemon=True)[0]
        assert p.wait(5) == -9
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_dead_run_is_reported_as_left_over(tmp_path):
    run = RunDir("dead", tmp_path)
    run.create()
    run.write_info(pid=2**22 + 7, start=1)           # no such process
    assert not run.daemon_alive()
    with pytest.raises(FileExistsError, match="hvnet clean dead"):
        RunDir("dead", tmp_path).create()
