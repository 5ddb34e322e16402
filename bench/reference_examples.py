"""The reference SDK's example backends, their own tests run side by side: on the reference SDK
and on lsdeploy after `label-studio-ml port`.

    python bench/reference_examples.py REF_CHECKOUT [--examples a,b] [--work /tmp/lsdeploy-ref-bench]

REF_CHECKOUT is an extracted checkout of HumanSignal/label-studio-ml-backend (DEVELOPERS.md
says how to get one; it is never part of this repository). For each example directory under
REF_CHECKOUT/label_studio_ml/examples, in its own two virtual environments under --work:

- reference: the reference SDK installed from REF_CHECKOUT (its requirements, with label-studio-sdk
  from PyPI where they name its git repository) plus the example's requirements.txt and
  requirements-test.txt; the example's tests run on a fresh copy of it;
- lsdeploy: this checkout's lsdeploy installed, the example copied, `label-studio-ml port` run on
  the copy, then its (ported) requirements.txt and requirements-test.txt; the same tests run.

Examples whose requirements need model weights or huge frameworks (torch, transformers, ...) are
skipped, saying which requirement. Prints one table: example | reference passed/failed |
lsdeploy passed/failed (failed counts errors too). Needs PyPI; it is not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Requirements that bring model weights or frameworks of gigabytes (or build them from source).
HEAVY = ("torch", "torchvision", "torchmetrics", "transformers", "tensorflow", "ultralytics", "nemo-toolkit", "nemo",
         "docling", "easyocr", "paddlepaddle", "paddleocr", "paddlex", "accelerate", "flair", "gliner",
         "segment-anything", "mobile-sam", "sam2", "openmim", "mmdet", "mmcv", "onnxruntime", "cuda-python")
PYTEST_TIMEOUT = 900
# Examples' tests mock the API calls, but their models build the client first, which wants a key
# (llm_interactive: OpenAI). The same placeholders on both sides; nothing is ever sent with them.
DUMMY_KEYS = {"OPENAI_API_KEY": "sk-bench-placeholder-not-a-key"}


def requirement_names(path: Path) -> list[tuple[str, str]]:
    """(normalized name, the line) of each requirement in a requirements file."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if match:
            out.append((re.sub(r"[-_.]+", "-", match.group(1)).lower(), line))
    return out


def heavy_requirement(example: Path) -> str | None:
    for name, line in requirement_names(example / "requirements.txt"):
        if name in HEAVY or name.startswith("paddle"):
            return line
    return None


def run(cmd, cwd=None, env=None, timeout=3600, log=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}\n[exit {proc.returncode}]\n")
    return proc


def make_venv(path: Path, log: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", path], log=log)
        run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], log=log)
    return python


def pip_install(python: Path, args, log: Path) -> None:
    proc = run([python, "-m", "pip", "install", "-q", *args], log=log)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"pip install failed: {tail[0]} (see {log})")


def without_reference(requirements: Path, dest: Path) -> Path:
    """A copy of an example's requirements without the lines that install the reference SDK
    (it is installed from the checkout instead)."""
    lines = [] if not requirements.is_file() else requirements.read_text(errors="replace").splitlines()
    kept = [line for line in lines if not re.search(r"label[-_]studio[-_]ml\b|label-studio-ml-backend", line)]
    dest.write_text("\n".join(kept) + "\n")
    return dest


def reference_requirements(checkout: Path, dest: Path) -> Path:
    """The reference SDK's requirements, label-studio-sdk from PyPI where they name its git URL."""
    lines = []
    for line in (checkout / "requirements.txt").read_text().splitlines():
        if "label-studio-sdk" in line and "git+" in line:
            line = "label-studio-sdk"
        lines.append(line)
    dest.write_text("\n".join(lines) + "\n")
    return dest


@dataclass
class Outcome:
    """One side's run of an example's tests."""

    passed: int = 0
    failed: int = 0  # failures and errors
    failing: frozenset = frozenset()  # the ids of the tests that failed
    note: str = ""
    ran: bool = True

    def cell(self) -> str:
        return f"{self.passed} passed / {self.failed} failed" if self.ran else "not run"


def pytest_outcome(python: Path, directory: Path, log: Path, env=None) -> Outcome:
    """The example's own tests in `directory`, counted from pytest's JUnit report."""
    report = directory / ".bench-junit.xml"
    report.unlink(missing_ok=True)
    try:
        proc = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
                   cwd=directory, env=env, timeout=PYTEST_TIMEOUT, log=log)
    except subprocess.TimeoutExpired:
        return Outcome(note=f"timed out after {PYTEST_TIMEOUT}s", ran=False)
    if not report.is_file():
        tail = (proc.stdout or proc.stderr).strip().splitlines()[-1:] or ["?"]
        return Outcome(note=f"no report: {tail[0]}", ran=False)
    root = ET.parse(report).getroot()
    passed, failing, skipped, first = 0, set(), 0, ""
    for case in root.iter("testcase"):
        name = f"{case.get('classname') or ''}::{case.get('name') or '?'}"
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is not None:
            failing.add(name)
            if not first:  # the first failure, in a few words
                message = problem.get("message") or ""
                if message in ("", "collection failure"):  # the traceback's last `E   ` line says why
                    lines = [l[1:].strip() for l in (problem.text or "").splitlines() if l.startswith("E ")]
                    message = lines[-1] if lines else message or "?"
                message = " ".join(message.split())
                first = f"first failure {case.get('name')}: {message[:90]}"
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    note = "; ".join(filter(None, [f"{skipped} skipped" if skipped else "", first]))
    return Outcome(passed, len(failing), frozenset(failing), note)


def test_env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LSDEPLOY_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env["MODEL_DIR"] = str(work / "model-dir")  # both SDKs keep their state here, never in a shared place
    env.update(DUMMY_KEYS)
    os.makedirs(env["MODEL_DIR"], exist_ok=True)
    return env


def bench_reference(checkout: Path, example: Path, work: Path) -> Outcome:
    log = work / "reference.log"
    python = make_venv(work / "venv-reference", log)
    if not (work / "venv-reference" / ".installed").exists():
        pip_install(python, ["-r", reference_requirements(checkout, work / "reference-sdk-requirements.txt")], log)
        pip_install(python, ["--no-deps", checkout], log)
        pip_install(python, ["gunicorn", "-r", without_reference(example / "requirements.txt", work / "ref-req.txt"),
                             "-r", without_reference(example / "requirements-test.txt", work / "ref-test-req.txt")], log)
        (work / "venv-reference" / ".installed").touch()
    copy = work / "reference"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(example, copy)
    return pytest_outcome(python, copy, log, env=test_env(work / "reference-state"))


def bench_lsdeploy(example: Path, work: Path) -> Outcome:
    log = work / "lsdeploy.log"
    python = make_venv(work / "venv-lsdeploy", log)
    fresh = not (work / "venv-lsdeploy" / ".installed").exists()
    # this checkout, as it is now (its dependencies the first time)
    pip_install(python, [REPO] if fresh else ["--force-reinstall", "--no-deps", REPO], log)
    copy = work / "lsdeploy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(example, copy)
    proc = run([python, "-m", "lsdeploy.cli", "port", copy], cwd=work, log=log)
    if proc.returncode != 0:
        return Outcome(note=f"port failed: {(proc.stderr or proc.stdout).strip()}", ran=False)
    not_ported = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    if fresh:
        # lsdeploy on the command line too, so requirements.txt's lsdeploy[sdk] resolves to this checkout
        pip_install(python, [REPO, "-r", copy / "requirements.txt", "-r", copy / "requirements-test.txt"]
                    if (copy / "requirements-test.txt").is_file() else [REPO, "-r", copy / "requirements.txt"], log)
        (work / "venv-lsdeploy" / ".installed").touch()
    outcome = pytest_outcome(python, copy, log, env=test_env(work / "lsdeploy-state"))
    if not_ported:
        outcome.note = "; ".join(filter(None, [outcome.note, f"port listed {len(not_ported)} not ported"]))
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, metavar="REF_CHECKOUT")
    parser.add_argument("--examples", default="", help="comma-separated example names (default: all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lsdeploy-ref-bench"))
    args = parser.parse_args()
    examples_dir = args.checkout / "label_studio_ml" / "examples"
    if not examples_dir.is_dir() or not (args.checkout / "setup.py").is_file():
        sys.exit(f"{args.checkout} is not a checkout of label-studio-ml-backend (no setup.py and "
                 "label_studio_ml/examples); pass the directory you extracted it to")
    names = [n for n in args.examples.split(",") if n] or sorted(p.name for p in examples_dir.iterdir() if p.is_dir())
    rows = []
    for name in names:
        example = examples_dir / name
        if not example.is_dir():
            rows.append((name, "-", "-", "no such example"))
            continue
        heavy = heavy_requirement(example)
        if heavy:
            rows.append((name, "skipped", "skipped", f"requirements.txt needs {heavy}"))
            print(f"{name}: skipped ({heavy})", file=sys.stderr, flush=True)
            continue
        work = args.work / name
        work.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        results = []
        for side in ("reference", "lsdeploy"):
            try:
                results.append(bench_reference(args.checkout, example, work) if side == "reference"
                               else bench_lsdeploy(example, work))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                results.append(Outcome(note=str(exc), ran=False))
        reference, lsdeploy = results
        notes = [f"reference: {reference.note}" if reference.note else "",
                 f"lsdeploy: {lsdeploy.note}" if lsdeploy.note else ""]
        if reference.ran and lsdeploy.ran and (reference.failed or lsdeploy.failed):
            if reference.failing == lsdeploy.failing:
                notes.insert(0, "the same tests fail on both")
            else:
                only = sorted(lsdeploy.failing - reference.failing)
                notes.insert(0, f"fail on lsdeploy only: {', '.join(only) or 'none'}")
        rows.append((name, reference.cell(), lsdeploy.cell(), "; ".join(filter(None, notes))))
        print(f"{name}: reference {reference.cell()}, lsdeploy {lsdeploy.cell()} "
              f"({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)
    header = ("example", "reference SDK", "lsdeploy (ported)", "notes")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
