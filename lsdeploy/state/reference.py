"""State a backend kept under the reference SDK (`label_studio_ml`), carried over once.

The reference keeps `get`/`set` values in `MODEL_DIR/cache.db`: a SQLite table
`cache(project_id TEXT, key TEXT, value TEXT, PRIMARY KEY(project_id, key))` whose values are
the strings the backend stored (its model version, label config, its own keys). The first time
a ported backend starts, `import_reference_state` copies every key the store does not have yet
(create-only: nothing lsdeploy wrote is replaced; each value stays the string it was) and
records that it did, so a running backend keeps its model version and keys, and later starts
(or other instances sharing the store) do not copy again.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from typing import Iterable, Optional

from .base import MISSING, StateStore

logger = logging.getLogger(__name__)

CACHE_FILE = "cache.db"
# The record that the import ran: a key of project "" (the reference's own default project
# is "" too, but it never writes this key).
MARKER_PROJECT = ""
MARKER_KEY = "lsdeploy.reference_state_imported"


def find_cache(directories: Iterable[Optional[str]]) -> Optional[str]:
    """The first `cache.db` in `directories` (the reference's MODEL_DIR candidates)."""
    seen = set()
    for directory in directories:
        if not directory:
            continue
        path = os.path.abspath(os.path.join(directory, CACHE_FILE))
        if path not in seen and os.path.isfile(path):
            return path
        seen.add(path)
    return None


def read_cache(path: str) -> list[tuple[str, str, str]]:
    """(project, key, value) rows of a reference cache.db, read-only; [] without the table."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='cache'").fetchone() is None:
            return []
        rows = conn.execute("SELECT project_id, key, value FROM cache ORDER BY project_id, key").fetchall()
    finally:
        conn.close()
    out = []
    for project, key, value in rows:
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if project is None or key is None or value is None:
            continue
        out.append((str(project), str(key), value if isinstance(value, str) else str(value)))
    return out


def import_reference_state(store: StateStore, *directories: Optional[str]) -> Optional[dict]:
    """Copy a reference `cache.db` (the first found in `directories`) into `store`, once.

    Answers what was done ({"source", "keys", "copied"}), or None when there was nothing to
    do (no cache.db, or imported before). A cache.db that cannot be read is logged and left
    for the next start; it never stops the server."""
    path = find_cache(directories)
    if path is None:
        return None
    if store.get(MARKER_PROJECT, MARKER_KEY, MISSING) is not MISSING:
        return None
    try:
        rows = read_cache(path)
    except sqlite3.Error as exc:
        logger.warning("cannot read the reference SDK's state in %s (%s): not imported; fix or remove the file",
                       path, exc)
        return None
    copied = 0
    for project, key, value in rows:
        if store.has(project, key):
            continue
        store.create(project, key, value)
        copied += 1
    record = {"source": path, "keys": len(rows), "copied": copied, "at": time.time()}
    store.create(MARKER_PROJECT, MARKER_KEY, record)
    logger.info("imported the reference SDK's state from %s: %d of %d keys%s", path, copied, len(rows),
                "" if copied == len(rows) else " (the others had values in lsdeploy's store, which are kept)")
    return record
