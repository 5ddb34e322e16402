"""Start-up errors for MODEL_DIR are one line each, naming the directory and what to do: a file
where the directory should be, a path through a file, a read-only file system (with and without
existing state), a full one. Read-only and full file systems are real tmpfs mounts (skipped where
this machine may not mount)."""
from __future__ import annotations

import subprocess

import pytest

from support import backend_dir, run_cli

MODEL = "from lsdeploy.model import LabelStudioMLBase\nclass A(LabelStudioMLBase): pass\n"


@pytest.fixture
def backend(tmp_path):
    return backend_dir(tmp_path, MODEL, "backend")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a fresh tmpfs directory; remount(path, options); unmounted at the end."""
    mounted = []

    def mount(options="size=4m"):
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(target)
        return target

    def remount(target, options):
        subprocess.run(["mount", "-o", f"remount,{options}", str(target)], check=True)

    yield mount, remount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def start(backend, model_dir):
    return run_cli("start", str(backend), "--port", "1", "--no-check-requirements", env={"MODEL_DIR": str(model_dir)},
                   timeout=60)


def one_line(done) -> str:
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr and "unexpected" not in done.stderr, done.stderr
    return lines[0]


def test_a_file_where_model_dir_should_be(backend, tmp_path):
    target = tmp_path / "state"
    target.write_text("")
    line = one_line(start(backend, target))
    assert f"MODEL_DIR {target} is a file, not a directory: set MODEL_DIR to a directory" in line


def test_a_model_dir_under_a_file(backend, tmp_path):
    (tmp_path / "file").write_text("")
    line = one_line(start(backend, tmp_path / "file" / "state"))
    assert f"cannot create MODEL_DIR {tmp_path / 'file' / 'state'}: a part of its path is a file" in line


def test_a_read_only_model_dir_with_existing_state(backend, tmpfs):
    mount, remount = tmpfs
    target = mount()
    import sys

    subprocess.run([sys.executable, "-c", "import sys; from lsdeploy.state import SQLiteStore; "
                    "SQLiteStore(sys.argv[1]).set('1', 'k', 1)", str(target)], check=True)  # state, written while writable
    remount(target, "ro")
    line = one_line(start(backend, target))
    assert str(target) in line and "read-only" in line and "MODEL_DIR" in line


def test_a_read_only_file_system_without_state(backend, tmpfs):
    mount, remount = tmpfs
    target = mount()
    remount(target, "ro")
    line = one_line(start(backend, target / "state"))
    assert f"cannot create MODEL_DIR {target / 'state'}: it is on a read-only file system" in line


def test_a_full_model_dir(backend, tmpfs):
    mount, _ = tmpfs
    target = mount("size=64k")
    (target / "filler").write_bytes(b"\0" * 64 * 1024)
    line = one_line(start(backend, target))
    assert str(target) in line and ("full" in line or "no space left" in line), line
