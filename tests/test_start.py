"""`label-studio-ml start` as a user meets it: --debug, the requirements check, the address it
listens on, and the warning when anyone may call the model."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
import requests
from click.testing import CliRunner

from lsdeploy import serve
from lsdeploy.requirements import unmet_requirements
from lsdeploy.serve import ServeSettings, default_host, exposure_warning
from support import CLI, Server, free_port, predict_body, run_cli, text_task, wait_for

FAILING_MODEL = textwrap.dedent('''
    from lsdeploy.model import LabelStudioMLBase

    class Echo(LabelStudioMLBase):
        def predict(self, tasks, context=None, **kwargs):
            if tasks[0]["data"]["text"] == "fail":
                raise ValueError("asked to fail")
            return [{"result": [], "score": 0.5} for _ in tasks]
''')
MINIMAL_MODEL = "from lsdeploy.model import LabelStudioMLBase\nclass A(LabelStudioMLBase): pass\n"


# -- --debug -------------------------------------------------------------------------------------
def start_debug(directory, port, log_path):
    """`start --debug` in a process group of its own (the reloader runs the server as a child)."""
    with open(log_path, "w") as log:
        return subprocess.Popen([*CLI, "start", str(directory), "--debug", "--port", str(port), "--host", "127.0.0.1"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def group_gone(pgid) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def port_free(port) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def debug_server(tmp_path):
    (tmp_path / "model.py").write_text(FAILING_MODEL)
    port, log = free_port(), tmp_path / "debug.log"
    proc = start_debug(tmp_path, port, log)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        assert proc.poll() is None, f"start --debug exited with {proc.returncode}:\n{log.read_text()}"
        return requests.get(url + "/health", timeout=2).json()["status"] == "UP"

    try:
        wait_for(healthy, timeout=60, message="start --debug to answer /health")
        yield proc, url, port, log
    finally:
        if not group_gone(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_debug_serves_after_the_reloader_restarts_and_stops_with_its_group(debug_server):
    proc, url, port, log = debug_server
    assert "Restarting with stat" in log.read_text()  # the reloader's child is what answers
    results = requests.post(url + "/predict", json=predict_body([text_task(1, "hello")]), timeout=10).json()["results"]
    assert results == [{"result": [], "score": 0.5, "model_version": "0.0.1"}]
    failed = requests.post(url + "/predict", json=predict_body([text_task(1, "fail")]), timeout=10)
    assert failed.status_code == 500 and failed.json()["error"] == "ValueError: asked to fail"
    assert "Traceback" in failed.json()["traceback"]  # --debug: the traceback in the answer
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(20) == 0
    wait_for(lambda: group_gone(proc.pid), timeout=20, message="every process of start --debug to exit")
    assert port_free(port)


def test_debug_server_stops_when_its_parent_is_killed(debug_server):
    proc, url, port, _ = debug_server
    proc.kill()  # the reloader's parent only: SIGKILL leaves it no time to stop its child
    proc.wait(10)
    wait_for(lambda: group_gone(proc.pid), timeout=20, message="the reloader's child to exit with its parent")
    assert port_free(port)


def test_debug_keeps_serving_across_a_broken_save_and_reloads_the_fix(debug_server, tmp_path):
    """A file saved half-edited does not end --debug: every request says why in JSON, and the next
    save that fixes it is served."""
    proc, url, port, log = debug_server
    model = tmp_path / "model.py"
    good = model.read_text()
    model.write_text(good + "\nclass Broken(LabelStudioMLBase) pass\n")

    def broken():
        assert proc.poll() is None, f"start --debug exited with {proc.returncode}:\n{log.read_text()}"
        answer = requests.get(url + "/health", timeout=2)
        return answer.status_code == 500 and "does not load" in answer.json()["error"] and answer.json()

    body = wait_for(broken, timeout=60, message="the broken save to be reported")
    assert "syntax error" in body["error"] and "fix it and save" in body["error"]
    model.write_text(good)
    wait_for(lambda: requests.get(url + "/health", timeout=2).json()["status"] == "UP", timeout=60,
             message="the fixed save to be served")
    assert "Traceback" not in log.read_text()
    assert '"GET /health HTTP/1.1"' not in log.read_text()  # werkzeug's own request lines are left out


def test_debug_with_a_broken_backend_is_one_line(tmp_path):
    (tmp_path / "model.py").write_text("import json\n")
    result = run_cli("start", tmp_path, "--debug", "--port", free_port(), "--host", "127.0.0.1", timeout=60)
    assert result.returncode == 2 and "no LabelStudioMLBase subclass" in result.stderr
    assert "Restarting" not in result.stderr  # fails before the reloader starts


# -- requirements ----------------------------------------------------------------------------------
REQUIREMENTS = """\
# the backend's own
flask>=2          # installed
Jinja2 >= 3.0     # another spelling of an installed name
not-installed-pkg-xyz>=1.0
click>=999 ; python_version >= "3"
pytest ; sys_platform == "nonexistent-platform"
lsdeploy>=99
label-studio-ml>=1
-r more.txt
--index-url https://example.invalid/simple
./wheels/thing-1.0-py3-none-any.whl
thing @ https://example.invalid/thing.tar.gz
requests>=2 \\
    --hash=sha256:0000000000000000000000000000000000000000000000000000000000000000
"""


def test_unmet_requirements_names_what_is_missing_and_why(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text(REQUIREMENTS)
    assert unmet_requirements(path) == [
        "not-installed-pkg-xyz>=1.0 (not installed)",
        f'click>=999 ; python_version >= "3" ({metadata.version("click")} installed)',
    ]
    assert unmet_requirements(tmp_path / "absent.txt") == []


def test_an_extras_own_requirements_are_checked(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("requests[socks]\n")
    try:
        metadata.distribution("PySocks")
        expected = []
    except metadata.PackageNotFoundError:
        expected = ["requests[socks] (its extra [socks] needs PySocks!=1.5.7,>=1.5.6: not installed)"]
    assert unmet_requirements(path) == expected


def test_included_files_and_lsdeploys_own_extras_are_checked(tmp_path):
    """`-r base.txt` as the reference examples write it (requirements-base.txt), followed like pip
    (relative, cycles cut); `lsdeploy[sdk]`, which port writes, needs its extra's packages."""
    (tmp_path / "deps").mkdir()
    (tmp_path / "requirements.txt").write_text("-r requirements-base.txt\n--requirement=deps/more.txt\nflask\n")
    (tmp_path / "requirements-base.txt").write_text("gunicorn\nnot-in-base-xyz\n-r requirements.txt\n")
    (tmp_path / "deps" / "more.txt").write_text("-rdeeper.txt\n")
    (tmp_path / "deps" / "deeper.txt").write_text("not-deep-xyz>=2\n")
    assert unmet_requirements(tmp_path / "requirements.txt") == ["not-in-base-xyz (not installed)",
                                                                  "not-deep-xyz>=2 (not installed)"]
    (tmp_path / "sdk.txt").write_text("lsdeploy[sdk]\nlsdeploy>=0.0.1\nlabel-studio-ml\n")
    try:
        metadata.distribution("label-studio-sdk")
        expected = []
    except metadata.PackageNotFoundError:
        expected = ["lsdeploy[sdk] (its extra [sdk] needs label-studio-sdk>=1.0: not installed)"]
    assert unmet_requirements(tmp_path / "sdk.txt") == expected


def test_start_refuses_unmet_requirements_in_one_line(tmp_path):
    (tmp_path / "model.py").write_text(MINIMAL_MODEL)
    (tmp_path / "requirements.txt").write_text(REQUIREMENTS)
    result = run_cli("start", tmp_path, "--port", free_port(), "--host", "127.0.0.1", timeout=60)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    requirements = tmp_path / "requirements.txt"
    prefix = f"error: {requirements} is not satisfied in this Python: "
    assert line.startswith(prefix)
    listed, advice = line[len(prefix):].split("; install it with: ")
    # only what is really missing here: markers, options, URLs, paths and lsdeploy are not
    assert listed == f'not-installed-pkg-xyz>=1.0 (not installed); click>=999 ; python_version >= "3" ' \
                     f'({metadata.version("click")} installed)'
    assert advice == (f"{sys.executable} -m pip install -r {requirements} "
                      "(or skip this check: --no-check-requirements, LSDEPLOY_CHECK_REQUIREMENTS=0)")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_the_requirements_check_can_be_skipped(tmp_path, how):
    (tmp_path / "model.py").write_text(MINIMAL_MODEL)
    (tmp_path / "requirements.txt").write_text("not-installed-pkg-xyz\n")
    args, env = (["--no-check-requirements"], None) if how == "flag" else ([], {"LSDEPLOY_CHECK_REQUIREMENTS": "0"})
    with Server(tmp_path, *args, env=env) as server:
        assert server.get("/health").json()["model_class"] == "A"


def test_a_created_text_classifier_passes_the_check_where_its_requirements_are_installed(created):
    """The image installs requirements.txt before `start` runs, as this test environment has."""
    directory = created("text-classifier")
    dockerfile = (directory / "Dockerfile").read_text()
    assert '-r requirements.txt' in dockerfile and dockerfile.index("pip install") < dockerfile.index("CMD")
    assert unmet_requirements(directory / "requirements.txt") == []


# -- the address -----------------------------------------------------------------------------------
@pytest.mark.parametrize("environ,files,expected", [
    ({}, set(), "127.0.0.1"),
    ({}, {"/.dockerenv"}, "0.0.0.0"),
    ({}, {"/run/.containerenv"}, "0.0.0.0"),
    ({"K_SERVICE": "my-backend"}, set(), "0.0.0.0"),
    ({"CLOUD_RUN_JOB": "train"}, set(), "0.0.0.0"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, set(), "0.0.0.0"),
    ({"K_SERVICE": ""}, set(), "127.0.0.1"),
])
def test_default_host_is_loopback_outside_a_container(environ, files, expected):
    assert default_host(environ, exists=files.__contains__) == expected


@pytest.fixture
def started(monkeypatch):
    """Run `start` in this process with serve.run replaced: the settings it would serve with."""
    from lsdeploy.commands.start import start

    seen = []
    monkeypatch.setattr(serve, "run", seen.append)
    monkeypatch.setattr(serve, "CONTAINER_FILES", ())  # as on a machine that is no container
    for name in serve.CONTAINER_ENV + ("HOST",):
        monkeypatch.delenv(name, raising=False)

    def invoke(*args, env=None):
        result = CliRunner().invoke(start, [str(a) for a in args], env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return seen.pop()

    return invoke


def test_start_listens_on_loopback_by_default_and_on_every_interface_in_a_container(started, created):
    directory = created("default")
    assert started(directory).host == "127.0.0.1"
    assert started(directory, env={"K_SERVICE": "my-backend"}).host == "0.0.0.0"
    assert started(directory, "--host", "::1").host == "::1"
    # the rendered Dockerfile sets HOST for the container, and docker-compose keeps it
    from lsdeploy.preview import dockerfile_env

    image_env = dockerfile_env((directory / "Dockerfile").read_text())
    assert image_env["HOST"] == "0.0.0.0"
    assert started(directory, env={k: image_env[k] for k in ("HOST", "PORT")}).host == "0.0.0.0"
    compose = (directory / "docker-compose.yml").read_text()
    assert "HOST=" not in compose and '"9090:9090"' in compose and "http://127.0.0.1:9090/health" in compose


def test_help_says_where_start_listens():
    out = " ".join(run_cli("start", "--help").stdout.split())
    assert "Default: 127.0.0.1 (this machine only); inside a container" in out and "0.0.0.0" in out
    assert "env var: LSDEPLOY_CHECK_REQUIREMENTS" in out


@pytest.mark.parametrize("host,auth,warned", [
    ("0.0.0.0", None, True), ("::", None, True), ("192.0.2.10", None, True),
    ("0.0.0.0", ("user", "secret-pass"), False),
    ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False), ("127.0.0.2", None, False),
])
def test_exposure_warning(host, auth, warned):
    warning = exposure_warning(ServeSettings(directory=".", host=host, port=9090, basic_auth=auth))
    assert (warning is not None) == warned
    if warned:
        assert warning.startswith(f"listening on {host}:9090 without basic auth") and "BASIC_AUTH_USER" in warning


@pytest.fixture
def restore_logging():
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def test_start_warns_once_when_anyone_may_call_the_model(tmp_path, monkeypatch, capfd, restore_logging):
    """run() on every interface: the warning line comes before serving (nothing binds here)."""
    (tmp_path / "model.py").write_text(MINIMAL_MODEL)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "state"))
    monkeypatch.setattr(serve, "check_port", lambda host, port: None)
    served = []
    monkeypatch.setattr(serve, "_serve", lambda settings, app: served.append(settings.host))
    serve.run(ServeSettings(directory=str(tmp_path), host="0.0.0.0", port=9090))
    serve.run(ServeSettings(directory=str(tmp_path), host="0.0.0.0", port=9090, basic_auth=("u", "pass-word-1")))
    err = capfd.readouterr().err
    assert served == ["0.0.0.0", "0.0.0.0"]
    assert err.count("[WARNING] [lsdeploy.serve] listening on 0.0.0.0:9090 without basic auth") == 1
    assert "pass-word-1" not in err


def test_no_warning_on_loopback(tmp_path):
    (tmp_path / "model.py").write_text(MINIMAL_MODEL)
    with Server(tmp_path) as server:
        assert server.get("/health").status_code == 200
    assert "serving A on 127.0.0.1" in server.log() and "without basic auth" not in server.log()


def test_the_basic_auth_password_can_come_from_a_file_and_never_shows_in_argv(tmp_path):
    """--basic-auth-pass on the command line is in every process's argv (`ps`); the file option
    and the environment variable keep it out."""
    from pathlib import Path

    (tmp_path / "model.py").write_text(MINIMAL_MODEL)
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-file\n")  # the trailing newline of `echo ... > file` is not part of it
    with Server(tmp_path, "--basic-auth-user", "ls", "--basic-auth-pass-file", str(secret)) as server:
        assert server.get("/versions").status_code == 401
        assert server.get("/versions", auth=("ls", "s3cret-from-file")).status_code == 200
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        for pid in [server.proc.pid, *map(int, children)]:
            assert b"s3cret" not in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert b"s3cret" not in Path(f"/proc/{pid}/environ").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--basic-auth-pass", "x", "--basic-auth-pass-file", "{file}"],
     "give --basic-auth-pass or --basic-auth-pass-file, not both"),
    (["--basic-auth-pass-file", "{missing}"], "--basic-auth-pass-file {missing}: cannot read it (No such file"),
    (["--basic-auth-pass-file", "{empty}"], "--basic-auth-pass-file {empty} is empty: write the secret in it"),
])
def test_a_bad_secret_file_is_one_line_naming_it(tmp_path, args, message):
    (tmp_path / "file").write_text("pw")
    (tmp_path / "empty").write_text("\n")
    paths = {"file": tmp_path / "file", "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    args = [a.format(**paths) for a in args]
    done = run_cli("start", str(tmp_path), "--basic-auth-user", "ls", *args)
    assert done.returncode == 2 and message.format(**paths) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_help_prefers_files_or_the_environment_for_secrets():
    for command in ("start", "connect"):
        text = " ".join(run_cli(command, "--help").stdout.split())  # as one line: help text is wrapped
        assert "--basic-auth-pass-file" in text and "argv is visible to other users" in text
    assert "--label-studio-api-key-file" in run_cli("connect", "--help").stdout


def test_the_label_studio_key_can_come_from_a_file(tmp_path):
    key = tmp_path / "key"
    key.write_text("abc")
    done = run_cli("connect", "http://127.0.0.1:1", "--label-studio-host", "http://127.0.0.1:1",
                   "--label-studio-api-key-file", str(key), "--project", "1", "--timeout", "1")
    assert done.returncode != 0 and "api-key" not in done.stderr.lower(), done.stderr  # got past the key
    done = run_cli("connect", "http://127.0.0.1:1", "--label-studio-host", "http://127.0.0.1:1", "--project", "1",
                   env={"LABEL_STUDIO_API_KEY": ""})
    assert done.returncode == 2 and "--label-studio-api-key-file" in done.stderr
