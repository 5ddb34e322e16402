"""A build's log, printed while Cloud Build writes it to the logs bucket."""
from __future__ import annotations


class LogStreamer:
    """Prints a build's log as Cloud Build writes it to gs://<logs bucket>/log-<id>.txt."""

    def __init__(self, storage_client, logs_bucket: str, build_id: str, progress):
        self.progress = progress
        self.offset = 0
        self.partial = b""
        self.lines: list = []
        self.where = None
        self.client = storage_client
        if logs_bucket.startswith("gs://") and not logs_bucket.endswith(".googleusercontent.com"):
            bucket, _, prefix = logs_bucket[5:].partition("/")
            self.where = (bucket, f"{prefix.rstrip('/') + '/' if prefix else ''}log-{build_id}.txt")

    def poll(self) -> None:
        if self.where is None:
            return
        try:
            # A fresh Blob each time: a downloaded Blob remembers its generation, and the log
            # object gets a new generation at every write.
            blob = self.client.bucket(self.where[0]).blob(self.where[1])
            chunk = blob.download_as_bytes(start=self.offset)
        except Exception:  # noqa: BLE001 - 404 before the first write, 416 when nothing new
            return
        if not chunk:
            return
        self.offset += len(chunk)
        data = self.partial + chunk
        *complete, self.partial = data.split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            self.progress(f"  build | {line}")

    def tail(self, count: int) -> list:
        lines = [line for line in self.lines if line.strip()]
        if self.partial.strip():
            lines.append(self.partial.decode("utf-8", "replace"))
        return lines[-count:]
