"""Which store a server process uses, and the process-wide default store."""
from __future__ import annotations

import os
import threading

from ..errors import StateError
from .base import StateStore
from .sqlite import SQLiteStore


def store_from_env(environ=None, model_dir: str | None = None) -> StateStore:
    """The store a server process uses: Cloud Storage when MODEL_STATE_URI is gs://...,
    otherwise SQLite under MODEL_DIR (default ./.lsdeploy)."""
    environ = os.environ if environ is None else environ
    uri = environ.get("MODEL_STATE_URI", "").strip()
    if uri:
        if not uri.startswith("gs://"):
            raise StateError(f"MODEL_STATE_URI={uri!r} is not supported: use gs://BUCKET/PREFIX or unset it")
        from .gcs import GCSStore  # imported only when selected: keeps the base image lean

        return GCSStore.from_uri(uri, environ=environ)
    return SQLiteStore(model_dir or environ.get("MODEL_DIR") or os.path.join(os.getcwd(), ".lsdeploy"))


_default_store: StateStore | None = None
_default_lock = threading.Lock()


def default_store() -> StateStore:
    """The process-wide store, created from the environment on first use."""
    global _default_store
    with _default_lock:
        if _default_store is None:
            _default_store = store_from_env()
        return _default_store


def set_default_store(store: StateStore | None) -> None:
    global _default_store
    with _default_lock:
        _default_store = store
