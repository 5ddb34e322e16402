"""Per-project model state: the `get`/`set`/`has` behind `LabelStudioMLBase`.

`StateStore` (base.py) is the interface. `SQLiteStore` (sqlite.py, with the checks of its
database file in sqlite_file.py) is the local default; `GCSStore` (gcs/) keeps state in Cloud
Storage, selected with ``MODEL_STATE_URI=gs://bucket/prefix`` by `store_from_env` (factory.py).
Values are anything JSON can carry; artifacts are whole files (trained weights).

Modules import downwards only: factory -> sqlite -> sqlite_file, and factory -> gcs; all of them
-> base. `GCSStore` is imported on first use, so google-cloud-storage (the ``gcs`` extra) is
needed only where it is selected.
"""
from .base import StateStore, check_artifact_name, safe_component
from .factory import default_store, set_default_store, store_from_env
from .sqlite import SQLiteStore

__all__ = ["StateStore", "SQLiteStore", "GCSStore", "store_from_env", "default_store", "set_default_store",
           "check_artifact_name", "safe_component"]


def __getattr__(name: str):
    if name == "GCSStore":
        from .gcs import GCSStore

        return GCSStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
