"""Artifacts in Cloud Storage: content-addressed files behind a pointer, and a local cache.

``artifacts/p-<project>/<name>/<sha256>`` holds immutable contents; the pointer
``state/p-<project>/a-<name>.json`` names the current ones. A save uploads the contents first
and then flips the pointer, so a reader sees the old or the new file, never a mix; the download
is checked against the hash and renamed into a local cache keyed by the hash (a second load of
the same version is a local path, no download). After a save, contents are deleted unless they
are the current or the previous version, the version the pointer names when read again (another
instance may have saved since), or were written (or re-used, ``saved_at`` metadata) within
``grace_seconds``: another instance may have uploaded them and not yet flipped the pointer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

from ...errors import StateError
from ..base import check_artifact_name
from .bucket import StateBucket
from .errors import describe
from .names import encode_body, project_dir, quote
from .snapshot import Entry, Snapshot

logger = logging.getLogger("lsdeploy.state.gcs")


class Artifacts:
    def __init__(self, objects: StateBucket, snapshot: Snapshot, cache_dir: str, owner: str, grace_seconds: float):
        self.objects = objects
        self.snapshot = snapshot
        self.cache_dir = cache_dir
        self.owner = owner
        self.grace_seconds = grace_seconds

    def _cache_path(self, project: str, name: str, digest: str) -> str:
        return os.path.join(self.cache_dir, self.objects.bucket_name, quote(self.objects.prefix) or "_",
                            project_dir(project), name, digest)

    def save(self, project, name, local_path) -> None:
        from google.api_core import exceptions as gexc

        objects = self.objects
        project = str(project)
        check_artifact_name(name)
        digest, size = _sha256_file(local_path)
        akey = ("a", project, name)
        previous_digest = _digest_of(self.snapshot.get(akey))
        content = objects.bucket.blob(objects.artifact_dir(project, name) + digest)
        try:
            try:
                # Create-only: the same contents under the same name are already whole.
                content.upload_from_filename(local_path, content_type="application/octet-stream",
                                             if_generation_match=0, retry=objects.retry, timeout=objects.timeout)
            except gexc.PreconditionFailed:
                # Re-used contents: mark them recent, so no collector deletes them before the
                # pointer names them (gone already: upload them again).
                content.metadata = {"saved_at": repr(time.time())}
                try:
                    content.patch(retry=objects.retry, timeout=objects.timeout)
                except gexc.NotFound:
                    content.upload_from_filename(local_path, content_type="application/octet-stream",
                                                 retry=objects.retry, timeout=objects.timeout)
        except Exception as exc:  # noqa: BLE001
            raise objects.write_error(f"artifact {name!r}", exc) from None
        pointer = {"sha256": digest, "size": size, "saved_by": self.owner, "saved_at": time.time()}
        data = encode_body(pointer)
        blob = objects.upload(objects.state_object(akey), data, f"artifact pointer {name!r}")
        self.snapshot.remember(akey, int(blob.generation), json.loads(data))
        self._cache_copy(local_path, self._cache_path(project, name, digest))
        if previous_digest and previous_digest != digest:
            self._collect(project, name, keep={digest, previous_digest})

    def _cache_copy(self, source: str, target: str) -> None:
        try:
            if os.path.exists(target):
                return
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, target)
        except OSError as exc:  # the cache is an optimisation: a later load downloads
            logger.warning("cannot cache artifact in %s: %s", target, exc)

    def _collect(self, project: str, name: str, keep: set) -> None:
        """Delete old contents (best effort). Kept besides `keep`: what the pointer names now
        (read again: this snapshot may be stale) and contents written or re-used within
        grace_seconds (another instance may be about to flip the pointer to them)."""
        objects = self.objects
        keep = set(keep)
        try:
            found = objects.download_state(("a", project, name), retry=None, timeout=objects.list_timeout)
            pointer = found[1].get("v") if found is not None else None
            if isinstance(pointer, dict):
                keep.add(pointer.get("sha256"))
            cutoff = time.time() - self.grace_seconds
            for blob in objects.client.list_blobs(objects.bucket, prefix=objects.artifact_dir(project, name),
                                                  timeout=objects.timeout):
                if blob.name.rsplit("/", 1)[-1] in keep or _saved_at(blob) > cutoff:
                    continue
                blob.delete(if_generation_match=blob.generation, if_metageneration_match=blob.metageneration,
                            timeout=objects.timeout, retry=None)  # not if re-used meanwhile
        except Exception as exc:  # noqa: BLE001 - garbage stays; it costs storage, not correctness
            logger.info("could not delete old versions of artifact %r: %s", name, describe(exc))
        cache = os.path.dirname(self._cache_path(project, name, "x"))
        with contextlib.suppress(OSError):
            for entry in os.listdir(cache):
                if entry not in keep and not entry.startswith(".tmp-"):
                    os.unlink(os.path.join(cache, entry))

    def load(self, project, name) -> Optional[str]:
        from google.api_core import exceptions as gexc

        objects, snapshot = self.objects, self.snapshot
        project = str(project)
        check_artifact_name(name)
        snapshot.fresh()
        for attempt in range(2):
            entry = snapshot.get(("a", project, name))
            if entry is None or not isinstance(entry.value, dict) or "sha256" not in entry.value:
                return None
            digest = entry.value["sha256"]
            path = self._cache_path(project, name, digest)
            if os.path.exists(path):
                return path
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            os.close(fd)
            degraded = snapshot.degraded(time.monotonic())
            try:
                blob = objects.bucket.blob(objects.artifact_dir(project, name) + digest)
                # While storage is degraded, one short try: a request must not hang on it.
                blob.download_to_filename(tmp, retry=None if degraded else objects.retry,
                                          timeout=objects.list_timeout if degraded else objects.timeout)
                got, _ = _sha256_file(tmp)
                if got != digest:
                    raise StateError(f"artifact {name!r} in {objects.uri} is corrupt (sha256 {got}, expected {digest})")
                os.replace(tmp, path)
                return path
            except gexc.NotFound:
                # Replaced (and its old contents deleted) since our snapshot: read the pointer
                # again (one request, not a refresh, which may be stuck) and look once more.
                if attempt == 0:
                    with contextlib.suppress(Exception):
                        found = objects.download_state(("a", project, name), retry=None, timeout=objects.list_timeout)
                        if found is not None:
                            snapshot.remember(("a", project, name), *found)
                    continue
                raise StateError(f"artifact {name!r} of project {project!r} is missing from {objects.uri}") from None
            except StateError:
                raise
            except Exception as exc:  # noqa: BLE001
                objects.outage.note(exc)
                raise StateError(f"artifact {name!r} of project {project!r} is not cached on this instance and "
                                 f"cannot be downloaded from {objects.uri}: {describe(exc)}"
                                 + ("; Cloud Storage is unreachable, it loads once storage answers again"
                                    if degraded else "")) from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return None


def _digest_of(entry: Optional[Entry]) -> Optional[str]:
    """The sha256 an artifact pointer names, or None."""
    return entry.value.get("sha256") if entry is not None and isinstance(entry.value, dict) else None


def _saved_at(blob) -> float:
    """When artifact contents were last written or re-used (epoch seconds)."""
    times = [blob.time_created.timestamp()] if blob.time_created is not None else []
    with contextlib.suppress(TypeError, ValueError):
        times.append(float((blob.metadata or {}).get("saved_at")))
    return max(times, default=float("inf"))


def _sha256_file(path: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
