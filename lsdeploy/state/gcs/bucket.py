"""gs://BUCKET/PREFIX as the store talks to it: the client, retries and timeouts, object names,
uploads, downloads and deletions of single objects, and what a refused request means in one line."""
from __future__ import annotations

import logging
from typing import Callable, Optional

from ...errors import StateError
from .errors import ROLE_HINT, Outage, describe, refused
from .names import decode_body, event_name, parse_state_name, project_dir, state_name

logger = logging.getLogger("lsdeploy.state.gcs")


def client_factory(uri: str, environ) -> Callable:
    """A function making the storage client for `uri`: STORAGE_EMULATOR_HOST (an emulator,
    anonymous credentials), GOOGLE_CLOUD_PROJECT, otherwise Application Default Credentials."""
    emulator = (environ.get("STORAGE_EMULATOR_HOST") or "").strip()
    project = environ.get("GOOGLE_CLOUD_PROJECT") or None

    def make_client():
        try:
            from google.cloud import storage
        except ImportError:
            raise StateError("MODEL_STATE_URI=gs://... needs google-cloud-storage: "
                             "pip install 'lsdeploy[gcs]'") from None
        if emulator:
            from google.auth.credentials import AnonymousCredentials

            endpoint = emulator if "://" in emulator else f"http://{emulator}"
            return storage.Client(project=project or "lsdeploy-emulator", credentials=AnonymousCredentials(),
                                  client_options={"api_endpoint": endpoint})
        try:
            return storage.Client(project=project)
        except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and friends
            raise StateError(f"no Google credentials for {uri}: {describe(exc)}; on Cloud Run the service "
                             "account is used, locally run `gcloud auth application-default login`") from None

    return make_client


class StateBucket:
    """The bucket and prefix of a store. Every storage request goes through `client` and
    `bucket` as they are at call time: a forked worker gets new ones (`reconnect`)."""

    def __init__(self, bucket_name: str, prefix: str, client, client_factory: Optional[Callable],
                 write_timeout: float, refresh_seconds: float, outage: Outage):
        self.bucket_name = bucket_name
        self.prefix = prefix
        self.uri = f"gs://{bucket_name}/{prefix}"
        self.state_prefix = prefix + "state/"
        self.write_timeout = write_timeout
        self.outage = outage
        self._client_factory = client_factory
        if client is None:
            if client_factory is None:
                raise TypeError("GCSStore needs a client or a client_factory")
            client = client_factory()
        self.client = client
        self.bucket = client.bucket(bucket_name)

        from google.cloud.storage.retry import DEFAULT_RETRY

        # Writes (and the reads inside update/load) retry transient errors for write_timeout s.
        self.retry = DEFAULT_RETRY.with_delay(initial=0.2, maximum=2.0, multiplier=2.0).with_timeout(write_timeout)
        # One request's own timeout (connect, read): a hanging request must not outlast the
        # retry deadline by much.
        self.timeout = (3.0, max(2.0, min(30.0, write_timeout)))
        # The refresh is retried by its own loop: a short timeout, no retry inside.
        self.list_timeout = (1.0, max(2.0, refresh_seconds))

    def retry_for(self, seconds: float):
        return self.retry.with_timeout(seconds)

    def reconnect(self) -> None:
        """After fork: HTTP connections do not survive it."""
        if self._client_factory is not None:
            self.client = self._client_factory()
            self.bucket = self.client.bucket(self.bucket_name)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001 - shutting down
            pass

    def who(self) -> str:
        email = getattr(getattr(self.client, "_credentials", None), "service_account_email", None)
        return f" as {email}" if isinstance(email, str) and "@" in email else ""

    # -- names ---------------------------------------------------------------------------
    def state_object(self, key: tuple) -> str:
        return self.state_prefix + state_name(*key)

    def artifact_dir(self, project: str, name: str) -> str:
        return f"{self.prefix}artifacts/{project_dir(project)}/{name}/"

    def lease_object(self, project: str) -> str:
        return f"{self.prefix}locks/{project_dir(project)}.json"

    def event_object(self, project: str, event_id: str) -> str:
        return f"{self.prefix}queue/{event_name(project, event_id)}"

    # -- state objects -------------------------------------------------------------------
    def list_state(self, retry) -> dict:
        """{key: generation} of every state object (one listing request per 1000 objects)."""
        listed: dict[tuple, int] = {}
        blobs = self.client.list_blobs(self.bucket, prefix=self.state_prefix,
                                       fields="items(name,generation),nextPageToken",
                                       timeout=self.list_timeout, retry=retry)
        for blob in blobs:
            parsed = parse_state_name(blob.name[len(self.state_prefix):])
            if parsed is not None:
                listed[parsed] = int(blob.generation)
        return listed

    def download_state(self, key: tuple, retry, timeout) -> Optional[tuple]:
        """(generation, body) of a state object, or None when it is gone."""
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(self.state_object(key))
        try:
            data = blob.download_as_bytes(retry=retry, timeout=timeout)
        except gexc.NotFound:
            return None
        try:
            return int(blob.generation), decode_body(data)
        except ValueError as exc:
            logger.warning("ignoring unreadable state object gs://%s/%s: %s", self.bucket_name, blob.name, exc)
            return None

    def read_for_update(self, key: tuple, what: str) -> Optional[tuple]:
        """`download_state` with the write retries; StateError when storage does not answer."""
        try:
            return self.download_state(key, retry=self.retry, timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001
            raise self.read_error(what, exc) from None

    # -- single objects, with the write retries --------------------------------------------
    def download(self, name: str, what: str) -> Optional[bytes]:
        """An object's bytes, or None when there is none; StateError when storage does not answer."""
        from google.api_core import exceptions as gexc

        try:
            return self.bucket.blob(name).download_as_bytes(retry=self.retry, timeout=self.timeout)
        except gexc.NotFound:
            return None
        except Exception as exc:  # noqa: BLE001
            raise self.read_error(what, exc) from None

    def remove(self, name: str, what: str) -> None:
        """Delete an object; a missing one is fine; StateError when storage refuses or does not answer."""
        from google.api_core import exceptions as gexc

        try:
            self.bucket.blob(name).delete(retry=self.retry, timeout=self.timeout)
        except gexc.NotFound:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self.write_error(f"deletion of {what}", exc, needs="storage.objects.delete") from None

    def upload(self, name: str, data: bytes, what: str, if_generation_match=None, retry=None):
        """Upload an object; the blob written. Up to 8 MiB the client sends one multipart
        request, where a precondition is honoured (state objects stay below 4 MiB for that);
        above, a resumable upload (queued event bodies: no precondition, their names are unique).
        PreconditionFailed is the caller's; any other failure is a StateError."""
        from google.api_core import exceptions as gexc

        blob = self.bucket.blob(name)
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=if_generation_match,
                                    retry=retry or self.retry, timeout=self.timeout)
        except gexc.PreconditionFailed:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.write_error(what, exc) from None
        return blob

    # -- errors --------------------------------------------------------------------------
    def write_error(self, what: str, exc: BaseException, needs: str = "storage.objects.create") -> StateError:
        """A write that failed, in one line; an unreachable storage also degrades the store."""
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.Forbidden):
            return StateError(f"cannot write {what} to {self.uri}{self.who()}: permission denied, needs "
                              f"{needs}; {ROLE_HINT} {self.bucket_name!r}")
        if isinstance(exc, gexc.NotFound):
            return StateError(f"cannot write {what}: bucket {self.bucket_name!r} does not exist any more")
        self.outage.note(exc)
        return StateError(f"cannot write {what} to {self.uri}: {describe(exc)} "
                          f"(retried for {self.write_timeout:.0f} s, MODEL_STATE_WRITE_TIMEOUT_SECONDS)")

    def read_error(self, what: str, exc: BaseException) -> StateError:
        """A read that failed, in one line; an unreachable storage also degrades the store."""
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.Forbidden):
            return StateError(f"cannot read {what} from {self.uri}{self.who()}: permission denied, needs "
                              f"storage.objects.get; {ROLE_HINT} {self.bucket_name!r}")
        self.outage.note(exc)
        return StateError(f"cannot read {what} from {self.uri}: {describe(exc)} "
                          f"(retried for {self.write_timeout:.0f} s, MODEL_STATE_WRITE_TIMEOUT_SECONDS)")

    def read_refused(self, exc: BaseException) -> StateError:
        """Why the first listing, at start-up, failed: a missing bucket, a permission, credentials."""
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.NotFound):
            return StateError(f"Cloud Storage bucket {self.bucket_name!r} does not exist ({self.uri}): create it "
                              f"(gcloud storage buckets create gs://{self.bucket_name}) or fix MODEL_STATE_URI")
        if isinstance(exc, gexc.Forbidden):
            return refused(f"no permission to read {self.uri}{self.who()}: needs storage.objects.list and "
                           f"storage.objects.get; {ROLE_HINT} {self.bucket_name!r} ({describe(exc)})")
        if isinstance(exc, gexc.Unauthorized):
            return StateError(f"Cloud Storage refused the credentials for {self.uri}: {describe(exc)}")
        return StateError(f"cannot reach Cloud Storage for {self.uri}: {describe(exc)}; "
                          "check the network and STORAGE_EMULATOR_HOST")

    def check_writable(self, owner: str) -> None:
        """Start-up: write and delete a probe object, or say which permission is missing."""
        from google.api_core import exceptions as gexc

        probe = self.bucket.blob(f"{self.prefix}.lsdeploy-probe/{owner}")
        try:
            probe.upload_from_string(b"probe", content_type="text/plain", if_generation_match=0,
                                     retry=self.retry_for(10.0), timeout=self.timeout)
        except gexc.Forbidden as exc:
            raise refused(f"cannot write to {self.uri}{self.who()}: needs storage.objects.create; "
                          f"{ROLE_HINT} {self.bucket_name!r} ({describe(exc)})") from None
        except Exception as exc:  # noqa: BLE001
            raise StateError(f"cannot write to {self.uri}: {describe(exc)}") from None
        try:
            probe.delete(retry=self.retry_for(10.0), timeout=self.timeout)
        except gexc.NotFound:
            pass
        except gexc.Forbidden as exc:
            raise refused(f"cannot delete in {self.uri}{self.who()}: needs storage.objects.delete; "
                          f"{ROLE_HINT} {self.bucket_name!r} ({describe(exc)})") from None
        except Exception as exc:  # noqa: BLE001
            raise StateError(f"cannot delete in {self.uri}: {describe(exc)}") from None
