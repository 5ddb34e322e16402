"""tests/engine.py against the real engine: what the other container tests and the Google fakes
rely on. A value passed in `env` reaches the container but no process's argv; build failures
name the failing step; digests are stable; cleanup() leaves no container or image behind."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from engine import BASE_IMAGE, BuildError, Engine, _epoch

TINY = f"FROM {BASE_IMAGE}\nRUN echo lsdeploy-engine-marker-7f3a > /built.txt\nCMD [\"python\", \"-c\", \"import time; time.sleep(600)\"]\n"


@pytest.fixture
def own(eng):
    """An Engine of this test's own: its cleanup() touches only what this test made."""
    mine = Engine(eng.name)
    yield mine
    mine.cleanup()


def tiny_image(own, tmp_path, tag, dockerfile=TINY):
    (tmp_path / "Dockerfile").write_text(dockerfile)
    return own.build(tmp_path, tag)


def argv_of_every_process() -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes())
            except OSError:
                pass
    return found


def test_env_reaches_the_container_and_no_argv(own, tmp_path):
    tiny_image(own, tmp_path, "localhost/lsdeploy-test/tiny:env")
    secret = "lsdeploy-argv-secret-" + os.urandom(8).hex()
    box = own.run("localhost/lsdeploy-test/tiny:env", env={"THE_KEY": secret, "SPACED": "a b  c"})
    assert box.running()
    assert not any(secret.encode() in argv for argv in argv_of_every_process())
    printed = box.exec(["python", "-c", "import os; print(os.environ['THE_KEY']); print(os.environ['SPACED'])"])
    assert printed.stdout.splitlines() == [secret, "a b  c"]
    assert secret not in own.history("localhost/lsdeploy-test/tiny:env")
    box.kill("KILL")
    assert box.wait(30) == 137


def test_a_value_an_env_file_cannot_carry_is_refused(own, tmp_path):
    tiny_image(own, tmp_path, "localhost/lsdeploy-test/tiny:refused")
    with pytest.raises(ValueError, match="newline"):
        own.run("localhost/lsdeploy-test/tiny:refused", env={"KEY": "two\nlines"})


def test_digest_is_stable_and_names_the_content(own, tmp_path):
    image = tiny_image(own, tmp_path, "localhost/lsdeploy-test/tiny:a")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image)
    own.tag("localhost/lsdeploy-test/tiny:a", "localhost/lsdeploy-test/tiny:b")
    assert own.digest("localhost/lsdeploy-test/tiny:a") == own.digest("localhost/lsdeploy-test/tiny:b") == image
    assert own.digest(BASE_IMAGE) != image
    assert own.exists("localhost/lsdeploy-test/tiny:b")
    assert own.remove_image("localhost/lsdeploy-test/tiny:b")
    assert not own.exists("localhost/lsdeploy-test/tiny:b") and own.exists("localhost/lsdeploy-test/tiny:a")
    assert "built.txt" in own.files("localhost/lsdeploy-test/tiny:a")
    assert own.grep("localhost/lsdeploy-test/tiny:a", b"lsdeploy-engine-marker-7f3a") == ["built.txt"]
    assert own.size("localhost/lsdeploy-test/tiny:a") >= own.size(BASE_IMAGE)


def test_a_failed_build_names_the_failing_step(own, tmp_path):
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nRUN pip install --no-index no-such-package-lsdeploy\n")
    with pytest.raises(BuildError) as failed:
        own.build(tmp_path, "localhost/lsdeploy-test/tiny:broken")
    assert "no-such-package-lsdeploy" in str(failed.value) and "build of" in str(failed.value)
    assert "No matching distribution" in failed.value.log


def test_cleanup_removes_the_containers_and_images_it_made(eng, tmp_path):
    mine = Engine(eng.name)
    tiny_image(mine, tmp_path, "localhost/lsdeploy-test/tiny:cleanup")
    box = mine.run("localhost/lsdeploy-test/tiny:cleanup")
    assert box.running()
    mine.cleanup()
    assert not eng.exists("localhost/lsdeploy-test/tiny:cleanup")
    assert eng.call(["ps", "--all", "--filter", f"id={box.id}", "--format", "{{.ID}}"]).stdout.strip() == ""


def test_prune_stale_removes_only_what_is_older_than_any_session(own, tmp_path):
    # what a killed session left: a tag in a test repository and a labelled container. A private
    # repository and label stand in for the real ones, so no other session's images are touched
    mark = os.urandom(4).hex()
    repository, label = f"localhost/lsdeploy-prune-{mark}/", f"lsdeploy-prune-{mark}"
    image = tiny_image(own, tmp_path, f"{repository}stale:1")
    own.tag(image, f"localhost/lsdeploy-keep-{mark}/other:1")
    cid = own.call(["create", "--label", label, image]).stdout.strip().splitlines()[-1]
    try:
        assert own.prune_stale(label=label, repositories=(repository,)) == []  # made just now: kept
        assert own.exists(f"{repository}stale:1")
        removed = own.prune_stale(older_than=-60, label=label, repositories=(repository,))
        assert cid.startswith(removed[0])  # `ps --quiet` gives the short id
        assert removed[1:] == [f"{repository}stale:1"]
        assert not own.exists(f"{repository}stale:1")
        assert own.exists(f"localhost/lsdeploy-keep-{mark}/other:1")  # another repository: untouched
    finally:
        own.call(["rm", "--force", cid], check=False)


@pytest.mark.parametrize("created, expected", [
    ("2026-12-02 19:36:15.123456789 +0000 UTC", 1796240175.0),  # podman
    ("2026-12-02T19:36:15.123456789Z", 1796240175.0),  # Docker
    ("2026-12-02T20:36:15+01:00", 1796240175.0),
])
def test_created_times_of_either_engine_are_read(created, expected):
    assert _epoch(created) == expected


def test_a_created_time_that_cannot_be_read_keeps_the_image():
    assert _epoch("yesterday") == float("inf")
