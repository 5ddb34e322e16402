"""A backend written for the reference SDK and ported with `label-studio-ml port` (the fixture of
tests/test_port.py, its original Dockerfile installing a system package with apt-get): the image
builds from what `port` wrote, keeps the system package, passes the image checks, serves on PORT,
predicts validly and stops on SIGTERM."""
from __future__ import annotations

from checks import image_problems, serve_problems
from images import SECRET
from support import TEXT_CONFIG, run_cli
from test_port import FILES, reference_backend

# A small system package instead of the fixture's git, libgl1 and tesseract-ocr (hundreds of MB):
# the apt-get path through `port` is the same.
DOCKERFILE = FILES["Dockerfile"].replace("git libgl1 tesseract-ocr", "libgomp1")


def ported_backend(parent):
    directory = reference_backend(parent / "keyword_sentiment", Dockerfile=DOCKERFILE)
    done = run_cli("port", directory)
    assert done.returncode == 0, done.stderr
    (directory / "label_config.xml").write_text(TEXT_CONFIG)
    return directory


def test_a_ported_backend_builds_and_serves(eng, built):
    image = built("ported", ported_backend)
    assert "apt-get install -y --no-install-recommends libgomp1" in (image.directory / "Dockerfile").read_text()
    assert image_problems(eng, image.tag, secret=SECRET) == []
    files = set(eng.files(image.tag))
    assert "app/model.py" in files and any(name.startswith("usr/lib/x86_64-linux-gnu/libgomp.so") or
                                           "/libgomp.so" in name for name in files)
    assert serve_problems(eng, image.tag, image.label_config, env={"LABEL_STUDIO_API_KEY": SECRET}) == []
