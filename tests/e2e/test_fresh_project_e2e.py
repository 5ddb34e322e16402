"""A first `deploy gcp` on a brand-new project, every rule of a post-May-2024 project on (issue 13):
APIs disabled until --enable-apis, Cloud Build running as a Compute Engine default account with no
role, builds refused outside Cloud Build's open regions, IAM grants that take a while to apply. The
deploy must reach a backend registered and connected in the real Label Studio."""
from __future__ import annotations

import json

import pytest

from support import run_cli
from test_labelstudio import NEGATIVE, POSITIVE, choices, retrieve_predictions

pytestmark = pytest.mark.e2e


@pytest.fixture
def gcs(own_emulator):
    return own_emulator


@pytest.mark.parametrize("region", ["us-central1", "europe-west4"])
def test_a_fresh_project_goes_from_nothing_to_a_registered_backend(label_studio, ls_api, project, make_gcp_fakes,
                                                                   gcs, tmp_path, region):
    cloud = make_gcp_fakes(runner=True, storage_url=gcs.url, iam_delay=0.5).fresh_project()
    directory = tmp_path / "fresh"
    assert run_cli("create", directory, "--blueprint", "text-classifier").returncode == 0
    pid = project(POSITIVE[:1] + NEGATIVE[:1])
    env = {**cloud.env, "GCP_PROJECT": "fresh-project", "GCP_REGION": region,
           "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
           "LSDEPLOY_MIN_INSTANCES": "0"}

    # --check lists exactly what is missing, and exits non-zero until it is fixed
    check = run_cli("deploy", "gcp", directory, "--check", "--json", env=env)
    assert check.returncode != 0
    report = json.loads(check.stdout)
    assert sorted(report["disabled_apis"]) == sorted(cloud.serviceusage.disabled) and not report["ready"]
    assert cloud.log.mutating() == []

    # without --enable-apis the deploy stops before any write, naming the command
    refused = run_cli("deploy", "gcp", directory, "--project", pid, env=env)
    assert refused.returncode == 5 and "gcloud services enable" in refused.stderr
    assert cloud.log.mutating() == []

    done = run_cli("deploy", "gcp", directory, "--project", pid, "--enable-apis", "--json", env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    (registration,) = result["registrations"]
    assert registration["state"] == "CO"
    assert result["image"].startswith(f"{region}-docker.pkg.dev/fresh-project/")
    if region == "europe-west4":  # not an open Cloud Build region: built next door, once
        assert result["build_region"] == "europe-west1" and result["build_region_note"]
    else:
        assert result["build_region"] == region and not result["build_region_note"]
    build = cloud.log.filter(api="cloudbuild", method="CreateBuild", status=200)[-1].request.build
    assert build.service_account.endswith("/serviceAccounts/lsdeploy-builder@fresh-project.iam.gserviceaccount.com")
    predictions = retrieve_predictions(ls_api, pid)
    assert len(predictions) == 2 and all(choices(p[0]) for p in predictions.values())

    check = run_cli("deploy", "gcp", directory, "--check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    # and the unchanged redeploy writes nothing
    cloud.log.clear()
    again = run_cli("deploy", "gcp", directory, "--project", pid, "--json", env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["revision"] == result["revision"]
    assert cloud.log.mutating() == [] and cloud.log.count(api="cloudbuild") == 0
