"""Each blueprint's image, built by a real engine from what `label-studio-ml create` wrote (with a
developer's local files beside it): it runs as a non-root user with an exec-form CMD, holds none
of the local files or the Label Studio key, serves /health on the PORT it is given, answers
/setup and /predict with predictions that fit its label config, and exits 0 within Cloud Run's
10 s of SIGTERM."""
from __future__ import annotations

from checks import image_problems, serve_problems
from images import SECRET


def test_the_image_holds_no_local_file_and_no_key_and_runs_as_a_user(eng, blueprint_image):
    assert image_problems(eng, blueprint_image.tag, secret=SECRET) == []
    config = eng.config(blueprint_image.tag)
    assert config["User"] == "app" and config["Cmd"] == ["label-studio-ml", "start", "/app"]
    files = set(eng.files(blueprint_image.tag))
    for name in ("app/model.py", "app/_wsgi.py", "app/label_config.xml", "app/requirements.txt"):
        assert name in files, f"{name} missing from the image"


def test_the_image_serves_on_port_predicts_validly_and_stops_on_sigterm(eng, blueprint_image):
    # The key reaches the container at run time (through the engine's env file), never the image.
    env = {"LABEL_STUDIO_API_KEY": SECRET, "LOG_LEVEL": "INFO"}
    assert serve_problems(eng, blueprint_image.tag, blueprint_image.label_config, env=env) == []
