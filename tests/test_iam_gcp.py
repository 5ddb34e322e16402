"""IAM as Google applies it: grants take minutes to reach Cloud Run, and a failed revision must not
leave the deploy stuck (issue 13.4)."""
from __future__ import annotations

import pytest

from gcp_support import PROJECT, backend, deploy, settings_for  # noqa: F401

from lsdeploy.errors import EXIT_DEPLOY, LsdeployError


def test_a_rerun_after_a_failed_revision_makes_a_new_revision(make_gcp_fakes, gcs_emulator, backend):
    cloud = make_gcp_fakes(storage_url=gcs_emulator.url)
    cloud.run.never_ready("iamstuck", message="The user-provided container failed to start and listen on the port.",
                          times=1)
    with pytest.raises(LsdeployError, match="failed to start"):
        deploy(cloud, backend, settings_for("iamstuck"))
    lines = []
    result = deploy(cloud, backend, settings_for("iamstuck"), lines)   # same code, same settings
    assert result.revision.startswith("iamstuck-00002-") and result.new_revision
    assert any("never became ready: deploying a new revision" in line for line in lines), lines
    assert cloud.log.count(api="cloudbuild", method="CreateBuild") == 1  # the image is reused
    cloud.log.clear()
    again = deploy(cloud, backend, settings_for("iamstuck"))            # and then it is unchanged again
    assert again.revision == result.revision and cloud.log.mutating() == []


def test_a_revision_refused_a_just_granted_secret_is_deployed_again_once_iam_applies(make_gcp_fakes, gcs_emulator, backend):
    cloud = make_gcp_fakes(storage_url=gcs_emulator.url, iam_delay=1.0)
    cloud.iam.only = ("/secrets/",)  # the build's grants apply at once here
    lines = []
    result = deploy(cloud, backend, settings_for("regranted"), lines)
    waits = [line for line in lines if "IAM changes take minutes" in line]
    assert waits and "Permission denied on secret" in waits[0] and "attempt 2" in waits[0], lines
    assert not result.revision.startswith("regranted-00001-")  # the first one was refused
    assert cloud.run.services[f"projects/{PROJECT}/locations/europe-west4/services/regranted"].message \
        .latest_ready_revision.endswith(result.revision)


def test_waiting_for_iam_is_bounded(make_gcp_fakes, gcs_emulator, backend):
    cloud = make_gcp_fakes(storage_url=gcs_emulator.url, iam_delay=3600)
    cloud.iam.only = ("/secrets/",)
    with pytest.raises(LsdeployError, match="Permission denied on secret") as info:
        deploy(cloud, backend, settings_for("never", iam_wait=0.5))
    assert info.value.exit_code == EXIT_DEPLOY and "traffic stays on the previous revision" in str(info.value)


def test_a_failed_revision_without_a_fresh_grant_is_not_retried(make_gcp_fakes, gcs_emulator, backend):
    cloud = make_gcp_fakes(storage_url=gcs_emulator.url)
    cloud.run.never_ready("broken", message="Permission denied on secret: projects/1/secrets/x/versions/1")
    deploy_settings = settings_for("broken", basic_auth=False, service_account="runner@demo-project.iam.gserviceaccount.com")
    lines = []
    with pytest.raises(LsdeployError, match="Permission denied"):
        deploy(cloud, backend, deploy_settings, lines)
    assert cloud.log.count(api="run", method="CreateService") == 1
    assert not any("IAM changes" in line for line in lines)
