"""The checks the good images pass must fail on the Dockerfile mistakes that would pass a build
and then fail on Cloud Run: each test breaks a freshly created backend one way, builds it with the
real engine, and expects the same check function to name the defect."""
from __future__ import annotations

import re

from checks import image_problems, serve_problems
from images import SECRET, created_backend, plant_local_files

MODEL_NEEDING_NUMPY = '''
import numpy as np

from lsdeploy.model import LabelStudioMLBase
from lsdeploy.response import ModelResponse


class NewModel(LabelStudioMLBase):
    def predict(self, tasks, context=None, **kwargs):
        return ModelResponse(predictions=[{"result": [], "score": float(np.float32(0.5))} for _ in tasks])
'''


def broken(tmp_path, eng, name, edit):
    """A default backend with `edit(directory)` applied, built as a throwaway image; its tag."""
    directory = created_backend("default")(tmp_path)
    plant_local_files(directory)
    edit(directory)
    tag = f"localhost/lsdeploy-test/broken-{name}:latest"
    eng.build(directory, tag, log_path=tmp_path / "build.log")
    return tag, (directory / "label_config.xml").read_text()


def rewrite(path, pattern, replacement):
    text = path.read_text()
    new = re.sub(pattern, replacement, text, flags=re.M)
    assert new != text, f"{pattern!r} not found in {path}"
    path.write_text(new)


def test_a_cmd_in_shell_form_is_reported(tmp_path, eng):
    tag, _ = broken(tmp_path, eng, "shell-cmd", lambda d: rewrite(
        d / "Dockerfile", r'^CMD \[.*\]$', "CMD label-studio-ml start /app"))
    problems = image_problems(eng, tag)
    assert len(problems) == 1 and problems[0].startswith("CMD is in shell form ('/bin/sh -c label-studio-ml start /app')")


def test_a_requirement_missing_from_requirements_txt_is_reported(tmp_path, eng):
    tag, config = broken(tmp_path, eng, "missing-requirement",
                         lambda d: (d / "model.py").write_text(MODEL_NEEDING_NUMPY))
    assert image_problems(eng, tag) == []  # the build and the image look fine...
    problems = serve_problems(eng, tag, config)  # ...until it runs
    assert len(problems) == 1, problems
    # the server's own one-line error, from the container's log
    assert problems[0].startswith("the container exited (code 2) before /health answered UP: "
                                  "error: importing /app/model.py failed: no module named 'numpy'"), problems


def test_an_image_running_as_root_is_reported(tmp_path, eng):
    tag, config = broken(tmp_path, eng, "root", lambda d: rewrite(d / "Dockerfile", r"^USER app\n", ""))
    assert image_problems(eng, tag) == ["runs as root (User ''): add a user and `USER` it in the Dockerfile"]
    assert serve_problems(eng, tag, config) == ["the server runs as root"]


def test_a_dockerignore_that_lets_local_files_in_is_reported(tmp_path, eng):
    def keep_env_and_git(directory):
        rewrite(directory / ".dockerignore", r"^(\.git|\*\*/\.env|\*\*/\.env\.\*)$\n", "")

    tag, _ = broken(tmp_path, eng, "leaky-ignore", keep_env_and_git)
    problems = image_problems(eng, tag, secret=SECRET)
    assert len(problems) == 2, problems
    assert problems[0].startswith("holds local files a .dockerignore must keep out: app/.env, app/.env.local, app/.git")
    assert problems[1].startswith("the secret is in the image's files: ")
    assert {"app/.env", "app/.env.local", "app/.git/config"} <= set(problems[1].split(": ", 1)[1].split(", "))
