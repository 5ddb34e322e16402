"""Model instances by (project, label config), least recently used evicted first.

One instance serves many requests (`setup()` runs once per instance, not per request, as it
does under the reference SDK's long-running servers); an instance set up with other
`extra_params` than the project's current ones is replaced on its next use.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

from .model import LabelStudioMLBase
from .state import StateStore, default_store


class ModelPool:
    """Model instances by (project, label config), least recently used evicted first."""

    def __init__(self, model_class, store: Optional[StateStore], size: int = 32):
        self.model_class = model_class
        self._store = store
        self.size = max(1, size)
        self._models: "OrderedDict[tuple, LabelStudioMLBase]" = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    @property
    def store(self) -> StateStore:
        return self._store or default_store()

    def get(self, project_id: str, label_config: Optional[str]) -> LabelStudioMLBase:
        if label_config is None:
            label_config = self.store.get(project_id, "label_config")
        key = (project_id, label_config or "")
        # An instance is set up with the project's extra_params; when they change (a /setup here,
        # or in another worker or instance), the next request gets a new instance whose setup()
        # sees them. One store read, from memory, like the model version each answer carries.
        extra = self.store.get(project_id, "extra_params")
        with self._lock:
            model = self._models.get(key)
            if model is not None and model._lsdeploy_extra == extra:
                self._models.move_to_end(key)
                return model
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one setup() per instance even when requests race
            # Read again under the lock: a request that read them before a /setup changed them
            # must not replace the instance another request just set up with the new ones.
            extra = self.store.get(project_id, "extra_params")
            with self._lock:
                model = self._models.get(key)
            if model is None or model._lsdeploy_extra != extra:
                try:
                    model = self._create(project_id, label_config, extra)
                except BaseException:
                    with self._lock:  # a refused config leaves nothing behind (its key holds the config)
                        if self._key_locks.get(key) is key_lock:
                            del self._key_locks[key]
                    raise
                with self._lock:
                    self._models[key] = model
                    while len(self._models) > self.size:
                        old, _ = self._models.popitem(last=False)
                        self._key_locks.pop(old, None)
        return model

    def latest(self, project_id: str) -> Optional[LabelStudioMLBase]:
        """The project's most recently used instance, unless its extra_params are out of date."""
        with self._lock:
            for (pid, _), model in reversed(self._models.items()):
                if pid == project_id:
                    break
            else:
                return None
        return model if model._lsdeploy_extra == self.store.get(project_id, "extra_params") else None

    def _create(self, project_id, label_config, extra):
        cls = self.model_class
        # The instance must see its store during __init__ (which calls setup()).
        model = cls.__new__(cls)
        model._store = self._store
        model._lsdeploy_extra = extra
        model.__init__(project_id=project_id, label_config=label_config)
        return model
