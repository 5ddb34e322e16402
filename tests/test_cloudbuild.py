"""cloudbuild.yaml: parsed strictly into the Cloud Build `Build` message, then its steps' commands
run locally, in order, against the Google API fakes and a real fake-gcs-server.

Running a step here does what Cloud Build does with it, minus the container: substitutions are
applied to `args`, `env`, `dir` and `availableSecrets` (`$$` is a literal `$`), `secretEnv`
values come from Secret Manager (the fake), the `lsdeploy` volume is a temporary directory, and
`entrypoint` runs with `args` in /workspace/<dir>.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml
from google.cloud.devtools import cloudbuild_v1
from google.protobuf import json_format


from lsdeploy.providers.gcp import GcpClients

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "cloudbuild.yaml"
PROJECT = "demo-project"
REGION = "europe-west4"
BUILTIN = {"PROJECT_ID", "PROJECT_NUMBER", "LOCATION", "BUILD_ID", "TRIGGER_NAME", "COMMIT_SHA", "SHORT_SHA",
           "REVISION_ID", "BRANCH_NAME", "TAG_NAME", "REPO_NAME", "REPO_FULL_NAME", "SERVICE_ACCOUNT_EMAIL",
           "SERVICE_ACCOUNT", "_HEAD_BRANCH", "_BASE_BRANCH", "_HEAD_REPO_URL", "_PR_NUMBER"}
# $$ (a literal $), ${NAME} or $NAME: the forms Cloud Build substitutes.
REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
API_KEY = "cb-secret-key-7f3a9c2e5d1b"


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def to_build(data: dict):
    """The Build message, strictly: an unknown key, a wrong type or a bad enum name raises.

    Cloud Build reads a YAML config as the JSON form of `Build` (camelCase JSON names, durations
    as "600s", enums by name), so the parsed YAML goes to ParseDict as it is; no key is renamed.
    """
    message = cloudbuild_v1.Build.pb()()
    json_format.ParseDict(data, message, ignore_unknown_fields=False)
    return cloudbuild_v1.Build.wrap(message)


def substitute(text: str, values: dict) -> str:
    def one(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"{match.group(0)} is not a substitution")
        return values[name]

    return REFERENCE.sub(one, text)


def references(build) -> set:
    texts = [build.available_secrets.secret_manager[i].version_name for i in range(len(build.available_secrets.secret_manager))]
    for step in build.steps:
        texts += [step.name, step.dir_, step.entrypoint, *step.args, *step.env]
    found = set()
    for text in texts:
        for match in REFERENCE.finditer(text):
            if match.group(0) != "$$":
                found.add(match.group(1) or match.group(2))
    return found


# ------------------------------------------------------------------------------------------------
# structure


def test_parses_strictly_into_the_build_message():
    build = to_build(load())
    assert [s.id for s in build.steps] == ["install", "test", "preview", "deploy"]
    assert build.timeout.seconds == 3600
    assert build.options.logging == cloudbuild_v1.BuildOptions.LoggingMode.CLOUD_LOGGING_ONLY
    # steps run one after another (no waitFor), in the same image, sharing only the volume
    for step in build.steps:
        assert not step.wait_for and step.entrypoint == "bash" and step.args[0] == "-c" and len(step.args) == 2
        assert step.name == "${_PYTHON_IMAGE}" and step.dir_ == "${_BACKEND_DIR}"
        assert [(v.name, v.path) for v in step.volumes] == [("lsdeploy", "/lsdeploy")]
    deploy = build.steps[-1].args[1]
    assert "label-studio-ml deploy gcp . --gcp-project-id \"$PROJECT_ID\"" in deploy
    assert '--gcp-region "${_REGION}"' in deploy and "--json" in deploy
    assert "label-studio-ml preview . --json" in build.steps[2].args[1]


def test_a_typo_in_a_key_is_rejected():
    data = load()
    data["steps"][0]["secretEnvs"] = ["X"]
    with pytest.raises(json_format.ParseError, match="secretEnvs"):
        to_build(data)
    data = load()
    data["options"]["logging"] = "CLOUD_LOGGING"
    with pytest.raises(json_format.ParseError):
        to_build(data)


def test_substitutions_all_declared_and_used():
    build = to_build(load())
    declared = set(build.substitutions)
    used = references(build)
    assert all(re.fullmatch(r"_[A-Z0-9_]+", name) for name in declared), declared
    # Cloud Build rejects an undefined $NAME and (without ALLOW_LOOSE) an unused substitution
    assert used - BUILTIN <= declared, used - BUILTIN - declared
    assert declared <= used, declared - used
    assert build.options.substitution_option != cloudbuild_v1.BuildOptions.SubstitutionOption.ALLOW_LOOSE


def test_the_label_studio_key_comes_only_from_secret_manager():
    build = to_build(load())
    secrets = list(build.available_secrets.secret_manager)
    assert [(s.env, s.version_name) for s in secrets] == [
        ("LABEL_STUDIO_API_KEY", "projects/$PROJECT_ID/secrets/${_LABEL_STUDIO_API_KEY_SECRET}/versions/latest")]
    users = [s.id for s in build.steps if "LABEL_STUDIO_API_KEY" in s.secret_env]
    assert users == ["deploy"]  # every secretEnv must be used by a step; only deploy gets it
    for step in build.steps:
        assert not any(e.split("=", 1)[0] == "LABEL_STUDIO_API_KEY" for e in step.env)
        # the key is read from the environment by the CLI, never expanded into an argument
        assert "$LABEL_STUDIO_API_KEY" not in step.args[1] and "${LABEL_STUDIO_API_KEY" not in step.args[1]
        assert "--label-studio-api-key" not in step.args[1]
    assert not any("KEY" in name and "SECRET" not in name for name in build.substitutions)
    assert not build.secrets  # the deprecated KMS form is not used


# ------------------------------------------------------------------------------------------------
# running the steps


class LocalBuild:
    """Runs the build's steps as Cloud Build would, minus the container."""

    def __init__(self, build, workspace: Path, volume: Path, environ: dict, substitutions: dict, secrets=None):
        self.build, self.workspace, self.volume = build, workspace, volume
        self.environ, self.secrets = environ, secrets
        self.values = {**dict(build.substitutions), **substitutions}

    def secret_env(self) -> dict:
        out = {}
        for entry in self.build.available_secrets.secret_manager:
            name = substitute(entry.version_name, self.values)
            out[entry.env] = self.secrets.access_secret_version(name=name).payload.data.decode()
        return out

    def run(self, step_id: str, timeout: float = 600) -> subprocess.CompletedProcess:
        step = next(s for s in self.build.steps if s.id == step_id)
        env = dict(self.environ)
        env.update(e.split("=", 1) for e in (substitute(x, self.values) for x in step.env))
        if step.secret_env:
            available = self.secret_env()
            env.update({name: available[name] for name in step.secret_env})
        mounts = {v.path: str(self.volume / v.name) for v in step.volumes}
        args = [self._mount(substitute(arg, self.values), mounts) for arg in step.args]
        cwd = self.workspace / substitute(step.dir_, self.values)
        return subprocess.run([shutil.which(step.entrypoint), *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)

    @staticmethod
    def _mount(text: str, mounts: dict) -> str:
        for path, local in mounts.items():
            # an absolute path starts the word: /lsdeploy/venv, not wheels/lsdeploy-*.whl
            text = re.sub(r"(?<![\w./-])" + re.escape(path) + r"(?=/|\s|$|\")", local, text)
        return text


@pytest.fixture
def gcs(gcs_emulator):
    return gcs_emulator


def create_backend(directory: Path, blueprint: str) -> Path:
    cli = Path(sys.executable).parent / "label-studio-ml"
    subprocess.run([str(cli), "create", str(directory), "--blueprint", blueprint], check=True, capture_output=True,
                   timeout=120)
    return directory


def store_secret(clients, secret_id: str, value: str):
    """A secret as a team stores it for the build (Cloud Build resolves it before the steps)."""
    from google.cloud import secretmanager_v1 as sm

    secret = clients.secrets.create_secret(parent=f"projects/{PROJECT}", secret_id=secret_id, secret=sm.Secret(
        replication=sm.Replication(automatic=sm.Replication.Automatic())))
    clients.secrets.add_secret_version(parent=secret.name, payload=sm.SecretPayload(data=value.encode()))
    return secret


def venv_volume(volume: Path) -> Path:
    """The `lsdeploy` volume with this test run's venv as its venv.

    The install step is not run by the tests that use this: this venv already has lsdeploy and
    the backends' requirements (scikit-learn), and installing them would need the package index.
    test_install_step_* runs the install step itself, offline.
    """
    (volume / "lsdeploy").mkdir(parents=True)
    (volume / "lsdeploy" / "venv").symlink_to(Path(sys.prefix))
    return volume


def base_env(home: Path) -> dict:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")}
    return {**keep, "HOME": str(home), "PIP_NO_INPUT": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def test_install_step_installs_the_backends_wheel_offline(tmp_path):
    """The install step for real, into a new venv, from the wheel `create` put in wheels/.

    No test reaches the internet: `_PIP_ARGS` keeps pip off any index and skips dependencies
    (they would come from the index in Cloud Build). The default blueprint has no requirements.
    """
    workspace = create_backend(tmp_path / "workspace", "default")
    (tmp_path / "volume").mkdir()
    local = LocalBuild(to_build(load()), workspace, tmp_path / "volume", base_env(tmp_path / "home"),
                       {"PROJECT_ID": PROJECT, "_PIP_ARGS": "--no-index --no-deps"})
    done = local.run("install", timeout=300)
    assert done.returncode == 0, done.stderr
    venv_python = tmp_path / "volume" / "lsdeploy" / "venv" / "bin" / "python"
    installed = subprocess.run([str(venv_python), "-c", "import importlib.metadata as m; print(m.version('lsdeploy'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    import lsdeploy

    assert installed == lsdeploy.__version__ and f"installed lsdeploy {installed}" in done.stdout
    assert (tmp_path / "volume" / "lsdeploy" / "venv" / "bin" / "label-studio-ml").exists()

    # an explicit spec that does not exist fails the step (and so the build)
    local.values["_LSDEPLOY_SPEC"] = str(tmp_path / "missing" / "lsdeploy-0.0.0-py3-none-any.whl")
    assert local.run("install", timeout=300).returncode != 0


def test_install_step_without_a_wheel_or_spec_says_what_to_set(tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (tmp_path / "volume").mkdir()
    local = LocalBuild(to_build(load()), workspace, tmp_path / "volume", base_env(tmp_path / "home"),
                       {"PROJECT_ID": PROJECT})
    done = local.run("install")
    assert done.returncode == 2 and "set the _LSDEPLOY_SPEC substitution" in done.stderr


def test_steps_test_preview_and_deploy_against_the_fakes(tmp_path, make_gcp_fakes, gcs):
    cloud = make_gcp_fakes(runner=True, storage_url=gcs.url)
    workspace = create_backend(tmp_path / "workspace", "text-classifier")
    (workspace / "tests").mkdir()
    (workspace / "tests" / "test_model.py").write_text(
        "from model import TextClassifier\n\n\n"
        "def test_model_class():\n"
        "    assert TextClassifier.__name__ == 'TextClassifier'\n")
    (workspace / "tests" / "conftest.py").write_text(
        "import sys, pathlib\nsys.path.insert(0, str(pathlib.Path(__file__).parent.parent))\n")
    clients = GcpClients.from_env(cloud.env, PROJECT)
    secret = store_secret(clients, "label-studio-api-key", API_KEY)
    volume = venv_volume(tmp_path / "volume")
    environ = {**base_env(tmp_path / "home"), **cloud.env}
    local = LocalBuild(to_build(load()), workspace, volume, environ, {
        "PROJECT_ID": PROJECT, "_REGION": REGION, "_SERVICE": "cb-backend", "_PIP_ARGS": "--no-index",
        "_DEPLOY_ARGS": "--min-instances 0 --max-instances 2"}, secrets=clients.secrets)

    tested = local.run("test")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "1 passed" in tested.stdout

    previewed = local.run("preview")
    assert previewed.returncode == 0, previewed.stderr
    report = json.loads(previewed.stdout)
    assert report["ok"] is True, report

    deployed = local.run("deploy", timeout=900)
    assert deployed.returncode == 0, deployed.stderr
    result = json.loads(deployed.stdout)  # --json: one object on stdout, progress on stderr
    assert json.loads((volume / "lsdeploy" / "deploy.json").read_text()) == result
    assert result["service"] == "cb-backend" and result["project"] == PROJECT and result["region"] == REGION
    assert result["built"] is True and result["revision"].startswith("cb-backend-00001-")
    assert result["registrations"] == []  # no _LABEL_STUDIO_URL: deployed without registering
    assert deployed.stderr.strip(), "progress goes to stderr"
    for output in (tested, previewed, deployed):
        assert API_KEY not in output.stdout + output.stderr

    service = clients.services.get_service(name=f"projects/{PROJECT}/locations/{REGION}/services/cb-backend")
    assert service.terminal_condition.state.name == "CONDITION_SUCCEEDED"
    assert service.uri == result["url"]
    assert service.template.scaling.min_instance_count == 0 and service.template.scaling.max_instance_count == 2
    env = {e.name for e in service.template.containers[0].env}
    assert "LABEL_STUDIO_API_KEY" not in env  # without Label Studio the key is not passed on or stored
    assert not any("label-studio-api-key" in s.name for s in clients.secrets.list_secrets(parent=f"projects/{PROJECT}")
                   if s.name != secret.name)
    health = requests.get(result["url"] + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["model_class"] == "TextClassifier"
    # nothing the steps wrote entered the deployed bundle (results live in the volume)
    assert not list(workspace.glob("*.json"))


def test_a_failing_backend_test_fails_the_build(tmp_path):
    workspace = create_backend(tmp_path / "workspace", "default")
    (workspace / "test_broken.py").write_text("def test_broken():\n    assert 1 == 2\n")
    local = LocalBuild(to_build(load()), workspace, venv_volume(tmp_path / "volume"), base_env(tmp_path / "home"),
                       {"PROJECT_ID": PROJECT, "_PIP_ARGS": "--no-index"})
    done = local.run("test")
    assert done.returncode == 1 and "1 failed" in done.stdout
    (workspace / "test_broken.py").unlink()
    skipped = local.run("test")
    assert skipped.returncode == 0 and "no tests in . " in skipped.stdout


def test_the_documented_github_workflow_is_valid_and_keyless():
    """docs/ci.md's workflow: valid YAML, federated auth, the key only from a repository secret."""
    text = (ROOT / "docs" / "ci.md").read_text()
    block = re.search(r"```yaml\n(name: deploy\n.*?)```", text, re.S).group(1)
    workflow = yaml.safe_load(block)
    assert workflow["permissions"]["id-token"] == "write"
    steps = workflow["jobs"]["deploy"]["steps"]
    uses = [s.get("uses", "") for s in steps]
    auth = steps[uses.index("google-github-actions/auth@v2")]
    assert set(auth["with"]) == {"workload_identity_provider", "service_account"}  # no credentials_json
    names = [s.get("name") for s in steps]
    assert names.index("Test") < names.index("Preview") < uses.index("google-github-actions/auth@v2") < names.index("Deploy")
    deploy = steps[names.index("Deploy")]
    assert deploy["env"] == {"LABEL_STUDIO_API_KEY": "${{ secrets.LABEL_STUDIO_API_KEY }}"}
    assert "label-studio-ml deploy gcp . --json" in deploy["run"]
    assert all("secrets." not in s.get("run", "") for s in steps)
    # every variable the workflow sets is one `deploy gcp` reads
    from click.testing import CliRunner

    from lsdeploy.cli import cli

    shown = CliRunner().invoke(cli, ["deploy", "gcp", "--help"], terminal_width=400).output
    for name in workflow["env"]:
        assert name in shown, name


def test_the_deploy_steps_exit_code_is_the_commands(tmp_path):
    """A bad service name is a usage error (exit 2) before any Google call; the step (and so the
    build) fails with that code, its one-line error on stderr and nothing on stdout."""
    from lsdeploy.errors import EXIT_USAGE

    workspace = create_backend(tmp_path / "workspace", "default")

    class SecretStore:  # what Cloud Build reads availableSecrets from
        def access_secret_version(self, name):
            from types import SimpleNamespace

            assert name == f"projects/{PROJECT}/secrets/label-studio-api-key/versions/latest"
            return SimpleNamespace(payload=SimpleNamespace(data=API_KEY.encode()))

    local = LocalBuild(to_build(load()), workspace, venv_volume(tmp_path / "volume"), base_env(tmp_path / "home"),
                       {"PROJECT_ID": PROJECT, "_SERVICE": "Not_A_Service"}, secrets=SecretStore())
    done = local.run("deploy")
    assert done.returncode == EXIT_USAGE, done.stderr
    assert done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Not_A_Service" in errors[0]
    assert API_KEY not in done.stderr
