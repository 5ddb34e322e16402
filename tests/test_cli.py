"""`label-studio-ml` as a user runs it: create, start, and the errors they hit."""
import os
import socket
import subprocess
import sys

import pytest

from support import REPO, free_port, run_cli


def test_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, time; t=time.perf_counter(); from lsdeploy.cli import main\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "heavy=[m for m in ('flask','gunicorn','google.cloud','requests','jinja2','werkzeug') if m in sys.modules]\n"
            "print('HEAVY', heavy, time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
    for name in ("create", "start", "connect", "preview", "deploy"):
        if os.path.exists(REPO / "lsdeploy" / "commands" / f"{name}.py") or name == "disconnect":
            assert name in out


def test_every_option_lists_its_environment_variable():
    out = " ".join(run_cli("start", "--help").stdout.split())
    for env in ("PORT", "HOST", "WORKERS", "THREADS", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LOG_LEVEL", "LSDEPLOY_MODEL"):
        assert f"env var: {env}" in out, env
    assert "env var: LSDEPLOY_BLUEPRINT" in " ".join(run_cli("create", "--help").stdout.split())


def test_create_renders_every_file(tmp_path):
    target = tmp_path / "backend"
    result = run_cli("create", target)
    assert result.returncode == 0, result.stderr
    names = {p.name for p in target.iterdir()}
    assert {"Dockerfile", "docker-compose.yml", "model.py", "_wsgi.py", "README.md", "requirements.txt",
            ".dockerignore", "label_config.xml", "wheels"} <= names
    assert "class NewModel(LabelStudioMLBase)" in (target / "model.py").read_text()
    assert "from model import NewModel" in (target / "_wsgi.py").read_text()


def test_create_json(tmp_path):
    import json

    result = run_cli("create", tmp_path / "b", "--blueprint", "text-classifier", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["directory"] == str(tmp_path / "b") and data["blueprint"] == "text-classifier" and data["from"] is None
    assert "model.py" in data["files"] and all((tmp_path / "b" / name).exists() for name in data["files"])


def test_create_refuses_non_empty_dir_without_force(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = run_cli("create", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--force" in result.stderr and "Traceback" not in result.stderr
    assert run_cli("create", tmp_path, "--force").returncode == 0
    assert (tmp_path / "keep.txt").exists()


def test_create_unknown_blueprint(tmp_path):
    result = run_cli("create", tmp_path / "x", "--blueprint", "nope")
    assert result.returncode == 2 and "choose one of: default, interactive-ner, text-classifier" in result.stderr


def test_create_from_script(tmp_path):
    script = tmp_path / "src" / "my_model.py"
    script.parent.mkdir()
    script.write_text("from lsdeploy.model import LabelStudioMLBase\n\nclass Mine(LabelStudioMLBase):\n    pass\n")
    (script.parent / "requirements.txt").write_text("numpy\nlsdeploy\n")
    result = run_cli("create", tmp_path / "out", "--from", script)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert (out / "my_model.py").read_text() == script.read_text()
    assert not (out / "model.py").exists()
    assert "from my_model import Mine" in (out / "_wsgi.py").read_text()
    assert (out / "requirements.txt").read_text().splitlines()[1:] == ["numpy"]
    two = tmp_path / "two.py"
    two.write_text("from lsdeploy.model import LabelStudioMLBase\nclass A(LabelStudioMLBase): pass\nclass B(LabelStudioMLBase): pass\n")
    result = run_cli("create", tmp_path / "out2", "--from", two)
    assert result.returncode == 2 and "--from" in result.stderr and "two.py:A" in result.stderr


@pytest.mark.parametrize("files,message", [
    (None, "does not exist; create one with: label-studio-ml create"),
    ({"model.py": "def broken(:\n"}, "model.py:1: syntax error"),
    ({"model.py": "import json\n"}, "no LabelStudioMLBase subclass in"),
    ({"model.py": "from lsdeploy.model import LabelStudioMLBase\nclass A(LabelStudioMLBase): pass\n"
                  "class B(LabelStudioMLBase): pass\n"}, "2 candidate model classes (model.py:A, model.py:B); choose one with --model model.py:A"),
    ({"model.py": "from label_studio_ml.model import LabelStudioMLBase\n"}, "imports label_studio_ml: port the backend with `label-studio-ml port "),
    ({"model.py": "import not_installed_pkg_xyz\n"}, "no module named 'not_installed_pkg_xyz'"),
    ({"notes.txt": "hi"}, "no model.py"),
])
def test_start_errors_are_one_line(tmp_path, files, message):
    directory = tmp_path / "backend"
    if files is not None:
        directory.mkdir()
        for name, text in files.items():
            (directory / name).write_text(text)
    result = run_cli("start", directory, "--port", free_port(), "--host", "127.0.0.1", timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_start_debug_shows_traceback(tmp_path):
    (tmp_path / "model.py").write_text("import json\n")
    result = run_cli("--debug", "start", tmp_path, "--port", free_port(), "--host", "127.0.0.1")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_start_port_in_use(tmp_path):
    (tmp_path / "model.py").write_text("from lsdeploy.model import LabelStudioMLBase\nclass A(LabelStudioMLBase): pass\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli("start", tmp_path, "--port", port, "--host", "127.0.0.1")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use: stop what uses it or choose another with --port (PORT)"


def test_start_reads_port_from_environment(tmp_path):
    from support import Server

    (tmp_path / "model.py").write_text("from lsdeploy.model import LabelStudioMLBase\nclass A(LabelStudioMLBase): pass\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lsdeploy.cli", "start", str(tmp_path), "--host", "127.0.0.1"],
                            env={**os.environ, "PORT": str(port), "WORKERS": "2"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        server = Server(tmp_path, port=port)
        server.proc = proc
        server.wait_healthy(60)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "2 worker(s)" in out


def test_basic_auth_needs_both(tmp_path):
    (tmp_path / "model.py").write_text("from lsdeploy.model import LabelStudioMLBase\nclass A(LabelStudioMLBase): pass\n")
    result = run_cli("start", tmp_path, "--basic-auth-user", "u", "--port", free_port())
    assert result.returncode == 2 and "needs both" in result.stderr


def test_version():
    assert run_cli("--version").stdout.startswith("label-studio-ml, version ")


def test_readme_first_command_creates_a_backend_git_ignores():
    import re
    import shutil

    command = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("python3 -m venv"))
    target = re.search(r"label-studio-ml create (\S+) && ", command).group(1)
    assert command.endswith(f"label-studio-ml start {target} --port 9090")
    if not (REPO / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", f"{target}/model.py"], cwd=REPO)
    assert ignored.returncode == 0, f"{target}/ is not ignored by git"


def test_create_again_on_its_own_untouched_directory_is_a_no_op(tmp_path):
    """The README's first command, run twice: create, start, then create again."""
    from support import Server

    target = tmp_path / "my-backend"
    assert run_cli("create", target).returncode == 0
    with Server(target) as server:  # leaves state and __pycache__ in DIR: not the user's changes
        assert server.get("/health").status_code == 200
    stamps = {p: p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()}
    again = run_cli("create", target)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [f"{target} was created from the default blueprint and is unchanged: nothing to do",
                                         f"next: label-studio-ml start {target} --port 9090"]
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()} == stamps

    other = run_cli("create", target, "--blueprint", "text-classifier")
    assert other.returncode == 2 and other.stderr.strip() == (
        f"error: {target} was created from the default blueprint, not the text-classifier blueprint; "
        "choose another directory, or pass --force to render over it")

    (target / "model.py").write_text((target / "model.py").read_text() + "# mine\n")
    (target / "README.md").unlink()
    refused = run_cli("create", target)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: {target} has changes since lsdeploy created it: README.md (deleted), model.py (edited); "
        "pass --force to render over them (they are lost), or choose another directory")
    assert (target / "model.py").read_text().endswith("# mine\n") and not (target / "README.md").exists()
    assert run_cli("create", target, "--force").returncode == 0
    assert (target / "README.md").exists() and not (target / "model.py").read_text().endswith("# mine\n")


def test_create_says_how_to_install_what_the_backend_needs_beyond_lsdeploy(tmp_path):
    import json

    script = tmp_path / "src" / "my_model.py"
    script.parent.mkdir()
    script.write_text("from lsdeploy.model import LabelStudioMLBase\n\nclass Mine(LabelStudioMLBase):\n    pass\n")
    (script.parent / "requirements.txt").write_text("not-installed-pkg-xyz>=1\nlsdeploy\n")
    out = tmp_path / "out"
    result = run_cli("create", out, "--from", script)
    assert result.returncode == 0, result.stderr
    install = f"{sys.executable} -m pip install -r {out / 'requirements.txt'}"
    assert result.stdout.splitlines()[1:] == [
        f"next: install its requirements (not-installed-pkg-xyz>=1 (not installed)): {install}",
        f"then: label-studio-ml start {out} --port 9090"]
    data = json.loads(run_cli("create", out, "--from", script, "--json").stdout)
    assert data["status"] == "unchanged" and data["install"] == install
    assert data["requirements"] == ["not-installed-pkg-xyz>=1"] and data["missing"] == ["not-installed-pkg-xyz>=1 (not installed)"]

    # scikit-learn is installed in the test environment: create says so instead
    classifier = run_cli("create", tmp_path / "tc", "--blueprint", "text-classifier")
    assert "its requirements (scikit-learn>=1.3,<2) are installed in this Python" in classifier.stdout
    plain = run_cli("create", tmp_path / "plain").stdout.splitlines()  # the default needs nothing more
    assert plain[1:] == [f"next: label-studio-ml start {tmp_path / 'plain'} --port 9090"]
