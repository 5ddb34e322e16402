"""Which predictions a Label Studio project uses: its `model_version` (Settings > Annotation >
Prelabeling), and pointing it at a backend's model version so the Data Manager shows the
backend's prediction scores.

What Label Studio 1.23 does with the project's `model_version` (read from its code and checked
against a running one):
- it is either an ML backend's title ("live": the labeling stream asks the backend for each task)
  or a prediction version (the stored predictions of that version are shown);
- adding a backend sets it to the backend's title when it is empty;
- the Data Manager's "Prediction score" column averages only the predictions whose model_version
  equals it, so with the title, which no prediction carries, the column stays empty;
- PATCH /api/projects/{id} accepts a version only when the project has a prediction of it ("Model
  version doesn't exist either as live model or as static predictions" otherwise);
- nothing moves it when the backend retrains and its version changes.

The client is duck-typed (anything with `get_project`, `backends`, `first_task`, `request` and
`call`, as `client.LabelStudio`), so this module imports nothing above `errors`.
"""
from __future__ import annotations

from .errors import _reason

SETTING = "Settings > Annotation > Prelabeling"


def use_version(client, pid: int, backend_id: int, version: str, attempts: int = 3, force: bool = False) -> tuple:
    """Point project `pid` at `version`, the model version of backend `backend_id`. Returns
    (the version the project uses now, a note for the user: what to do for the Data Manager's
    scores now or after the model retrains). Only a project on no version or on this backend's
    title (what Label Studio sets when a backend is added) is moved, unless `force`: another
    version may be imported predictions the team labels from. A project that uses another
    backend's live predictions is always left as it is. Label Studio stores no prediction when
    its 1 s health check of the backend misses: up to `attempts` tries."""
    current = client.get_project(pid).get("model_version") or ""
    if current == version:
        return current, _after_retraining(version)
    titles = {int(b.get("id", 0)): b.get("title") for b in client.backends(pid)}
    mine = titles.pop(int(backend_id), None)
    if current and current in titles.values():
        return current, (f"the project uses the live predictions of another backend, {current!r} ({SETTING}): "
                         "left as it is")
    if current and current != mine and not force:
        return current, (f"the project shows the predictions of model version {current!r} ({SETTING}), left as "
                         f"it is: pass --scores to point it at this model's version {version} (after it "
                         "retrained, that is how to see the new scores)")
    resp = _set(client, pid, version)
    for _ in range(attempts):  # Label Studio takes a version once it has a prediction of it
        if resp.status_code != 400 or "doesn't exist" not in _reason(resp) or not _store_one_prediction(client, pid):
            break
        resp = _set(client, pid, version)
    if resp.status_code >= 400:
        return current, (f"the Data Manager's Prediction score column stays empty until the project uses model "
                         f"version {version}: get the backend's predictions (Data Manager > Actions > "
                         f"Retrieve Predictions), then pick {version} in {SETTING} "
                         f"({resp.status_code}: {_reason(resp)})")
    return version, _after_retraining(version)


def _after_retraining(version: str) -> str:
    return (f"the Data Manager shows the scores of model version {version} ({SETTING}); Label Studio keeps that "
            "version when the model retrains: then pick the new one there, or run connect --scores again")


def _set(client, pid: int, version: str):
    return client.request("PATCH", f"/api/projects/{pid}", json={"model_version": version})


def _store_one_prediction(client, pid: int) -> bool:
    """Have Label Studio get and store the backend's prediction for one task of the project (the
    Data Manager's retrieve-predictions action on that task). False when the project has no task."""
    task = client.first_task(pid)
    if not task:
        return False
    client.call("POST", "/api/dm/actions", f"getting a prediction for a task of project {pid}",
                params={"id": "retrieve_tasks_predictions", "project": pid},
                json={"selectedItems": {"all": False, "included": [task["id"]]}})
    return True
