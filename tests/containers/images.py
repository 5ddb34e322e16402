"""The backends the container tests build: blueprints rendered by `label-studio-ml create`, with
a developer's local files planted beside the code (none of which may reach the image)."""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from support import run_cli

# A recognisable fake Label Studio key: put where a careless build would copy it (.env, .git,
# local state), then searched for in every file of the image.
SECRET = "lsdeploy-fake-ls-key-" + secrets.token_hex(12)


def plant_local_files(directory: Path) -> None:
    """What a developer's backend directory holds beside the code: the secrets of a local run, a
    git repository, local state, a compose override. None of it may reach the image."""
    (directory / ".env").write_text(f"LABEL_STUDIO_API_KEY={SECRET}\nBASIC_AUTH_PASS={SECRET}-pass\n")
    (directory / ".env.local").write_text(f"LABEL_STUDIO_API_KEY={SECRET}\n")
    (directory / ".git").mkdir(exist_ok=True)
    (directory / ".git" / "config").write_text(f'[remote "origin"]\n\turl = https://user:{SECRET}@example.com/r.git\n')
    (directory / ".lsdeploy").mkdir(exist_ok=True)
    (directory / ".lsdeploy" / "state.sqlite3").write_text(f"local state {SECRET}\n")
    (directory / "docker-compose.override.yml").write_text(f"# {SECRET}\n")


@dataclass
class BuiltImage:
    name: str
    directory: Path
    tag: str
    image: str
    label_config: str


def created_backend(blueprint: str):
    """make(parent) for `built`: `label-studio-ml create` of a blueprint."""
    def make(parent: Path) -> Path:
        directory = parent / blueprint
        done = run_cli("create", directory, "--blueprint", blueprint)
        assert done.returncode == 0, done.stderr
        return directory

    return make


BLUEPRINTS = ("default", "text-classifier", "interactive-ner")


