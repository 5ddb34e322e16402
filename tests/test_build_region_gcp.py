"""Cloud Build's restricted regions (issue 13.3): some new or low-usage projects may build only in a
few regions; the deploy builds in the nearest open one once, and the image stays in the service's
region."""
from __future__ import annotations

import pytest
from google.api_core import exceptions

from gcp_support import PROJECT, REGION, backend, cli_env, deploy, settings_for  # noqa: F401
from support import run_cli

from lsdeploy.errors import LsdeployError
from lsdeploy.providers.gcp.settings import nearest_build_region


@pytest.fixture
def restricted(make_gcp_fakes, gcs_emulator):
    cloud = make_gcp_fakes(storage_url=gcs_emulator.url)
    cloud.cloudbuild.restrict_regions()
    return cloud


def test_the_fake_refuses_a_restricted_region_like_cloud_build(restricted):
    from google.cloud.devtools import cloudbuild_v1 as cb

    from fakes.fixtures import make_clients

    clients = make_clients(restricted.url)
    with pytest.raises(exceptions.BadRequest, match="due to quota restrictions, cannot run builds in this region"):
        clients.builds.create_build(parent=f"projects/{PROJECT}/locations/{REGION}", build=cb.Build(
            steps=[cb.BuildStep(name="ubuntu")]))


def test_a_refused_build_region_falls_back_once_to_the_nearest_open_one(restricted, backend):
    lines = []
    result = deploy(restricted, backend, settings_for("elsewhere"), lines)
    creates = restricted.log.filter(api="cloudbuild", method="CreateBuild")
    assert [c.path for c in creates] == [f"/v1/projects/{PROJECT}/locations/{REGION}/builds",
                                         f"/v1/projects/{PROJECT}/locations/europe-west1/builds"]
    assert [c.status for c in creates] == [400, 200]
    assert result.build_region == "europe-west1" and "built in europe-west1 instead" in result.build_region_note
    assert any(line.startswith("note: Cloud Build may not run builds in europe-west4") for line in lines)
    assert result.image.startswith(f"{REGION}-docker.pkg.dev/{PROJECT}/")  # the image stays in the service's region
    assert any("built in europe-west1" in line for line in result.lines())


def test_an_explicit_build_region_is_used_and_not_second_guessed(restricted, backend):
    result = deploy(restricted, backend, settings_for("chosen", build_region="us-central1"))
    assert result.build_region == "us-central1" and not result.build_region_note
    with pytest.raises(LsdeployError, match="pass --build-region with one of us-central1"):
        deploy(restricted, backend, settings_for("refused", build_region="europe-west2"))
    assert restricted.log.count(api="cloudbuild", method="CreateBuild", status=400) == 1


def test_cli_build_region_option_and_variable(restricted, backend):
    done = run_cli("deploy", "gcp", backend, "--service", "cli-region", "--min-instances", "0", "--json",
                   env={**cli_env(restricted, "cli-region"), "LSDEPLOY_BUILD_REGION": "asia-east1"})
    assert done.returncode == 0, done.stderr
    assert '"build_region": "asia-east1"' in done.stdout


@pytest.mark.parametrize("region, nearest", [("europe-west4", "europe-west1"), ("us-east4", "us-central1"),
                                             ("us-west1", "us-west2"), ("asia-southeast1", "asia-east1"),
                                             ("australia-southeast2", "australia-southeast1"),
                                             ("us-central1", "us-central1")])
def test_nearest_open_build_region(region, nearest):
    assert nearest_build_region(region) == nearest
