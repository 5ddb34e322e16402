"""tests/progress.sh: the long installs of tests/run.sh and tests/labelstudio.sh say what they are at
instead of minutes of silence, and a failed one shows the end of its log."""
from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "progress.sh"


def run_with_progress(tmp_path, command: str, every: int = 1) -> subprocess.CompletedProcess:
    log = tmp_path / "step.log"
    return subprocess.run(["bash", "-c", f'. "{SCRIPT}"; run_with_progress "installing demo" "{log}" bash -c \'{command}\''],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "LSDEPLOY_PROGRESS_SECONDS": str(every)})


def test_a_long_step_prints_its_progress_and_the_step_it_is_at(tmp_path):
    done = run_with_progress(tmp_path, "echo Collecting label-studio==1.23.2; sleep 3; echo ok")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any(line.startswith("  installing demo: ") and line.endswith("at: Collecting label-studio==1.23.2")
               for line in lines), lines
    assert lines[-1].startswith("  installing demo: done in ")
    assert done.stdout == ""  # the command's own output goes to its log
    assert (tmp_path / "step.log").read_text().splitlines() == ["Collecting label-studio==1.23.2", "ok"]


def test_a_failed_step_keeps_its_status_and_shows_the_end_of_its_log(tmp_path):
    done = run_with_progress(tmp_path, "echo ERROR: No matching distribution found for nothing; exit 3", every=60)
    assert done.returncode == 3
    assert "ERROR: No matching distribution found for nothing" in done.stderr
    assert f"installing demo failed with exit status 3 (log: {tmp_path / 'step.log'})" in done.stderr


def test_a_quick_step_stays_quiet(tmp_path):
    done = run_with_progress(tmp_path, "echo Collecting x", every=60)
    assert (done.returncode, done.stderr) == (0, "")
