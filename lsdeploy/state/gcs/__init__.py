"""Model state in Cloud Storage, shared by every instance of a deployed backend.

Selected with ``MODEL_STATE_URI=gs://BUCKET/PREFIX`` (needs the ``gcs`` extra; google-cloud-storage
is imported only when a store is made). docs/state.md is the user-facing description; the
modules' docstrings are the design:

- names.py: the object layout under the prefix and the body of a state object;
- errors.py: storage errors as one line, and the outage that degrades the store;
- bucket.py: the client, retries and timeouts, small uploads and downloads, start-up checks;
- snapshot.py: the in-memory snapshot that serves every read, and its refresh thread;
- artifacts.py: content-addressed artifacts behind a pointer, the local cache, garbage collection;
- lease.py: the training lease (one fit per project across instances);
- store.py: `GCSStore`, the keys (get/set/create/update/delete) and the parts put together.

Imports point down: store -> artifacts, lease -> snapshot -> bucket -> errors, names -> ..base.
"""
from .names import parse_uri
from .store import GCSStore

__all__ = ["GCSStore", "parse_uri"]
