"""Cloud Storage: the sources and state buckets, access to the state bucket, listing and
deleting a service's objects."""
from __future__ import annotations

from ...errors import EXIT_DEPLOY, EXIT_USAGE, LsdeployError
from ..base import _quiet
from .errors import GoogleApiError, google_error


def ensure_bucket(api, settings, name: str, progress):
    from google.api_core import exceptions as gexc

    client = api.clients.storage
    try:
        bucket = client.lookup_bucket(name)
        if bucket is None:
            progress(f"creating Cloud Storage bucket gs://{name} in {settings.region}")
            try:
                bucket = client.create_bucket(new_bucket(client, name), location=settings.region)
            except gexc.Conflict:
                bucket = client.bucket(name)
                if client.lookup_bucket(name) is None:
                    raise LsdeployError(f"the bucket name gs://{name} is taken by another project: choose "
                                        "another with --source-bucket/--state-bucket", EXIT_USAGE) from None
        return bucket
    except gexc.Forbidden as exc:
        error = google_error(exc, "storage", "using bucket", f"gs://{name}", settings.project)
        if error.reason == "PERMISSION_DENIED":
            error = GoogleApiError(f"{error}; bucket names are global: if gs://{name} belongs to another "
                                   "project, choose another name with --source-bucket/--state-bucket",
                                   error.exit_code, error.reason)
        raise error from None
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "storage", "using bucket", f"gs://{name}", settings.project) from None


def new_bucket(client, name: str):
    """A bucket as lsdeploy creates it: uniform bucket-level access (organization policies commonly
    require it, and lsdeploy grants only through IAM) and public access prevention enforced."""
    bucket = client.bucket(name)
    bucket.iam_configuration.uniform_bucket_level_access_enabled = True
    bucket.iam_configuration.public_access_prevention = "enforced"
    return bucket


def grant_bucket_access(api, settings, bucket, member: str, progress=_quiet,
                        role: str = "roles/storage.objectUser", why: str = "the service",
                        identity: str = "runtime") -> None:
    """`role` for `member` on a bucket (by default the service's identity on the state bucket:
    every instance reads and writes model state there, MODEL_STATE_URI). The policy is read first
    and written only when the member lacks the role; an identity that may not read the policy
    (the least-privilege set-up of docs/ci.md, where the grant is made by hand) gets a note with
    the command instead of a failed deploy."""
    from google.api_core import exceptions as gexc

    where = f"gs://{bucket.name}"
    command = (f"gcloud storage buckets add-iam-policy-binding {where} --member {member} --role {role}")
    try:
        policy = bucket.get_iam_policy(requested_policy_version=3)
    except gexc.NotFound:
        if api.clients.storage_emulated:
            progress(f"the storage emulator has no IAM: not granting {role} on {where}")
            return
        raise LsdeployError(f"reading the IAM policy of {where} failed: the bucket was not found", EXIT_DEPLOY) from None
    except gexc.Forbidden:
        progress(f"note: the deploying identity may not read the IAM policy of {where} (storage.buckets.getIamPolicy)"
                 f"; {why} needs {role} there: if it is not granted yet, run `{command}`")
        api.unchecked_grants.append((identity, f"{why} holds {role} on {where}", command))
        return
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "storage", "reading the IAM policy of", where, settings.project) from None
    for binding in policy.bindings:
        if binding.get("role") == role and member in binding.get("members", ()):
            return
    policy.bindings.append({"role": role, "members": {member}})
    try:
        bucket.set_iam_policy(policy)
    except gexc.GoogleAPICallError as exc:
        error = google_error(exc, "storage", f"granting {role} to {member} on", where, settings.project)
        if error.reason == "PERMISSION_DENIED":
            error.args = (f"{error} (or run `{command}` once)",)
        raise error from None
    api.granted(identity, bucket.name)
    progress(f"granted {role} on {where} to {member.split(':', 1)[-1]}")


def list_blobs(api, settings, bucket: str, prefix: str) -> list:
    from google.api_core import exceptions as gexc

    try:
        return list(api.clients.storage.list_blobs(bucket, prefix=prefix))
    except gexc.NotFound:
        return []
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "storage", "listing", f"gs://{bucket}/{prefix}", settings.project) from None


def delete_blobs(api, settings, bucket: str, blobs) -> None:
    from google.api_core import exceptions as gexc

    for blob in blobs:
        try:
            blob.delete()
        except gexc.NotFound:
            pass  # already gone: what was asked for
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "storage", "deleting", f"gs://{bucket}/{blob.name}", settings.project) from None
