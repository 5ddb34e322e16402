"""SourceBundle: what goes into the build, and the same files always give the same bytes."""
from __future__ import annotations

import io
import os
import tarfile
import time

import pytest

from lsdeploy import __version__
from lsdeploy.bundle import IgnoreRules, SourceBundle
from lsdeploy.errors import LsdeployError

MODEL = "from lsdeploy.model import LabelStudioMLBase\n\nclass M(LabelStudioMLBase):\n    pass\n"


def names(bundle):
    with tarfile.open(fileobj=io.BytesIO(bundle.data), mode="r:gz") as tar:
        return sorted(m.name for m in tar.getmembers() if m.isfile())


def member(bundle, name):
    with tarfile.open(fileobj=io.BytesIO(bundle.data), mode="r:gz") as tar:
        return tar.extractfile(name).read()


@pytest.fixture
def backend(tmp_path):
    d = tmp_path / "backend"
    d.mkdir()
    (d / "model.py").write_text(MODEL)
    (d / "requirements.txt").write_text("")
    return d


def test_bundle_has_code_wheel_and_blueprint_dockerfile(backend):
    bundle = SourceBundle.from_directory(backend)
    assert names(bundle) == ["Dockerfile", "model.py", "requirements.txt",
                             f"wheels/lsdeploy-{__version__}-py3-none-any.whl"]
    assert bundle.dockerfile == "blueprint:default"
    assert b"label-studio-ml" in member(bundle, "Dockerfile")
    assert len(bundle.digest) == 64 and bundle.size == len(bundle.data)
    assert [f.path for f in bundle.files] == names(bundle)


def test_same_files_same_bytes_regardless_of_mtime_and_order(backend, tmp_path):
    first = SourceBundle.from_directory(backend)
    os.utime(backend / "model.py", (time.time() + 1000, time.time() + 1000))
    (backend / "__pycache__").mkdir()
    (backend / "__pycache__" / "model.cpython-312.pyc").write_bytes(b"junk")
    second = SourceBundle.from_directory(backend)
    assert second.data == first.data and second.digest == first.digest
    # the same content in another directory (other inode order, other name) gives the same digest
    other = tmp_path / "copy"
    other.mkdir()
    (other / "requirements.txt").write_text("")
    (other / "model.py").write_text(MODEL)
    assert SourceBundle.from_directory(other).digest == first.digest


def test_a_code_change_changes_the_digest(backend):
    before = SourceBundle.from_directory(backend).digest
    (backend / "model.py").write_text(MODEL + "# changed\n")
    assert SourceBundle.from_directory(backend).digest != before


def test_never_bundled(backend):
    for rel in (".git/config", ".venv/lib/x.py", "myenv/pyvenv.cfg", "myenv/lib/site.py", ".lsdeploy/state.sqlite3",
                "pkg/__pycache__/a.pyc", ".pytest_cache/v", "wheels/lsdeploy-0.0.1-py3-none-any.whl"):
        path = backend / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (backend / "pkg" / "util.py").write_text("X = 1\n")
    (backend / "wheels" / "other-1.0-py3-none-any.whl").write_text("keep")
    got = names(SourceBundle.from_directory(backend))
    assert "pkg/util.py" in got and "wheels/other-1.0-py3-none-any.whl" in got
    assert not [n for n in got if n.startswith((".git", ".venv", "myenv", ".lsdeploy", ".pytest_cache"))
                or "__pycache__" in n]
    assert [n for n in got if n.startswith("wheels/lsdeploy-")] == [f"wheels/lsdeploy-{__version__}-py3-none-any.whl"]


def test_gcloudignore_wins_over_dockerignore(backend):
    (backend / "data").mkdir()
    (backend / "data" / "big.bin").write_bytes(b"0" * 10)
    (backend / "notes.md").write_text("n")
    (backend / "keep.md").write_text("k")
    (backend / ".dockerignore").write_text("notes.md\n")
    (backend / ".gcloudignore").write_text("# comment\ndata/\n*.md\n!keep.md\n")
    bundle = SourceBundle.from_directory(backend)
    got = names(bundle)
    assert bundle.ignore_file == ".gcloudignore"
    assert "keep.md" in got and "notes.md" not in got and "data/big.bin" not in got
    (backend / ".gcloudignore").unlink()
    bundle = SourceBundle.from_directory(backend)
    assert bundle.ignore_file == ".dockerignore"
    assert "notes.md" not in names(bundle) and "data/big.bin" in names(bundle)


def test_gcloudignore_include_and_anchors(backend):
    (backend / ".gitignore").write_text("secret.txt\n")
    (backend / ".gcloudignore").write_text("#!include:.gitignore\n/top.txt\nsub/**/deep.txt\n")
    for rel in ("secret.txt", "top.txt", "sub/top.txt", "sub/a/b/deep.txt", "sub/deep.txt"):
        (backend / rel).parent.mkdir(parents=True, exist_ok=True)
        (backend / rel).write_text("x")
    got = names(SourceBundle.from_directory(backend))
    assert "secret.txt" not in got and "top.txt" not in got and "sub/top.txt" in got
    assert "sub/a/b/deep.txt" not in got and "sub/deep.txt" not in got


def test_own_dockerfile_is_kept(backend):
    own = "FROM python:3.12-slim\nCOPY . /app\nCMD [\"label-studio-ml\", \"start\", \"/app\"]\n"
    (backend / "Dockerfile").write_text(own)
    bundle = SourceBundle.from_directory(backend)
    assert bundle.dockerfile == "own" and member(bundle, "Dockerfile").decode() == own


def test_ignored_dockerfile_is_an_error(backend):
    (backend / "Dockerfile").write_text("FROM scratch\n")
    (backend / ".gcloudignore").write_text("Dockerfile\n")
    with pytest.raises(LsdeployError, match="excluded by .gcloudignore"):
        SourceBundle.from_directory(backend)


def test_archive_metadata_is_fixed(backend):
    (backend / "run.sh").write_text("#!/bin/sh\n")
    (backend / "run.sh").chmod(0o755)
    with tarfile.open(fileobj=io.BytesIO(SourceBundle.from_directory(backend).data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["run.sh"].mode == 0o755 and members["model.py"].mode == 0o644
    assert {m.mtime for m in members.values()} == {315532800}
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members.values()} == {(0, 0, "", "")}


def test_ignore_rules_directory_exclusion_cannot_be_undone_inside_gitignore_but_can_in_docker():
    rules = IgnoreRules(["build/", "!build/keep.txt"])
    assert rules.excluded("build/keep.txt", is_dir=False)
    assert not rules.excluded("src/build.py", is_dir=False)
    assert IgnoreRules(["*.log"]).excluded("a/b/c.log", is_dir=False)
    docker = IgnoreRules(["build/", "!build/keep.txt"], dialect="docker")
    assert not docker.excluded("build/keep.txt", is_dir=False) and docker.excluded("build/x", is_dir=False)
    assert not docker.prunes("build")  # the walk must look inside for the exception
    assert not IgnoreRules(["*.log"], dialect="docker").excluded("a/b/c.log", is_dir=False)
    assert IgnoreRules(["**/*.log"], dialect="docker").excluded("a/b/c.log", is_dir=False)
    assert IgnoreRules(["*/temp*"], dialect="docker").excluded("somedir/temporary.txt", is_dir=False)
    assert not IgnoreRules(["*/temp*"], dialect="docker").excluded("a/b/temp", is_dir=False)


def test_missing_directory():
    with pytest.raises(LsdeployError, match="does not exist"):
        SourceBundle.from_directory("/nonexistent/backend")


def test_dockerignore_uses_dockers_rules(backend):
    # Docker anchors every pattern at the context root: `data` and `env` are ./data and ./env only
    (backend / ".dockerignore").write_text("# comment\ndata\nenv/\n*.md\n!README.md\nbuild/\n!build/keep.txt\n"
                                           "**/*.log\n/top.txt\n")
    for rel in ("data/big.bin", "env/bin/python", "mypkg/data/loader.py", "mypkg/env/config.py", "notes.md",
                "README.md", "sub/notes.md", "build/keep.txt", "build/out.o", "a/b/c.log", "x.log", "top.txt",
                "sub/top.txt", "mypkg/__init__.py"):
        (backend / rel).parent.mkdir(parents=True, exist_ok=True)
        (backend / rel).write_text("x")
    bundle = SourceBundle.from_directory(backend)
    got = names(bundle)
    assert bundle.ignore_file == ".dockerignore"
    assert {"mypkg/data/loader.py", "mypkg/env/config.py", "README.md", "sub/notes.md", "build/keep.txt",
            "sub/top.txt", "mypkg/__init__.py"} <= set(got)
    assert not {"data/big.bin", "env/bin/python", "notes.md", "build/out.o", "a/b/c.log", "x.log",
                "top.txt"} & set(got)


def test_dockerignore_listing_the_dockerfile_still_builds(backend):
    own = "FROM python:3.12-slim\nCOPY . /app\n"
    (backend / "Dockerfile").write_text(own)
    (backend / ".dockerignore").write_text("Dockerfile\n.dockerignore\n")
    bundle = SourceBundle.from_directory(backend)  # Docker sends both to the builder anyway
    assert bundle.dockerfile == "own" and member(bundle, "Dockerfile").decode() == own
    (backend / ".dockerignore").unlink()
    (backend / ".gcloudignore").write_text("Dockerfile\n")
    with pytest.raises(LsdeployError, match="excluded by .gcloudignore"):
        SourceBundle.from_directory(backend)


def test_gcloudignore_keeps_gitignore_rules(backend):
    # gcloud reads .gcloudignore as gitignore: `data` matches at any depth, an excluded directory stays excluded
    (backend / ".gcloudignore").write_text("data\nbuild/\n!build/keep.txt\n")
    for rel in ("data/big.bin", "mypkg/data/loader.py", "build/keep.txt", "mypkg/util.py"):
        (backend / rel).parent.mkdir(parents=True, exist_ok=True)
        (backend / rel).write_text("x")
    got = names(SourceBundle.from_directory(backend))
    assert "mypkg/util.py" in got
    assert not {"data/big.bin", "mypkg/data/loader.py", "build/keep.txt"} & set(got)


def test_blueprint_dockerignore_keeps_package_subdirectories(tmp_path):
    from lsdeploy.blueprints import create

    directory = tmp_path / "b"
    create(directory)
    for rel in ("mypkg/__init__.py", "mypkg/data/loader.py", "mypkg/env/config.py", "data/server/x.sqlite3",
                "mypkg/__pycache__/a.cpython-312.pyc"):
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / rel).write_text("x")
    got = names(SourceBundle.from_directory(directory))
    assert {"mypkg/data/loader.py", "mypkg/env/config.py", "model.py", ".dockerignore"} <= set(got)
    assert not [n for n in got if n.startswith("data/") or "__pycache__" in n]


def test_local_secrets_are_never_bundled(backend):
    for rel in (".env", ".env.production", "sub/.env", "docker-compose.yml", "docker-compose.override.yaml",
                "compose.yaml"):
        (backend / rel).parent.mkdir(parents=True, exist_ok=True)
        (backend / rel).write_text("LABEL_STUDIO_API_KEY=sekrit\n")
    (backend / ".gcloudignore").write_text("!.env\n!docker-compose.yml\n")  # cannot be re-included
    bundle = SourceBundle.from_directory(backend)
    assert names(bundle) == [".gcloudignore", "Dockerfile", "model.py", "requirements.txt",
                             f"wheels/lsdeploy-{__version__}-py3-none-any.whl"]
    assert not [n for n in names(bundle) if "env" in n.split("/")[-1] or "compose" in n]
    assert bundle.find("sekrit") == ""
    (backend / "config.py").write_text("KEY = 'sekrit'\n")
    assert SourceBundle.from_directory(backend).find("sekrit") == "config.py"


def test_missing_requirements_get_an_empty_file_for_the_blueprint_dockerfile(backend):
    (backend / "requirements.txt").unlink()
    bundle = SourceBundle.from_directory(backend)
    assert member(bundle, "requirements.txt") == b""
    assert {f.path: f.source for f in bundle.files}["requirements.txt"] == "blueprint"
    assert b"COPY requirements.txt" in member(bundle, "Dockerfile")
    # a backend's own Dockerfile decides for itself
    (backend / "Dockerfile").write_text("FROM python:3.12-slim\nCOPY . /app\n")
    assert "requirements.txt" not in names(SourceBundle.from_directory(backend))
