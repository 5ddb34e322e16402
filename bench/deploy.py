"""`deploy gcp` cost against the Google API fakes: requests, bytes uploaded, builds, wall time.

    python bench/deploy.py [--runner]

Three deploys of a freshly created backend (default blueprint) to the fakes (tests/fakes) with a
real fake-gcs-server for Cloud Storage: the first deploy, an unchanged redeploy, and a redeploy
after a one-line code change. Requests are every call the deploy made: the four control-plane
APIs (the fakes' request log, operation polls included) plus Cloud Storage (counted on the
storage client's HTTP session; the fake build service's own log writes are not ours and are not
counted). Bytes uploaded are the request bodies of Cloud Storage uploads. With --runner the Cloud
Run fake starts each revision as a local process (wall time then includes its start-up).

Reference, `gcloud run deploy --source` (observed, gcloud 528): about 23 requests on a first
deploy, and about 19 requests with a full upload and a full rebuild on an unchanged redeploy.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fakes.cloud import FakeGoogleCloud  # noqa: E402
from fakes.fixtures import FAST_POLLING  # noqa: E402
from gcs_emulator import GCSEmulator  # noqa: E402

from lsdeploy.blueprints import create  # noqa: E402
from lsdeploy.bundle import SourceBundle  # noqa: E402
from lsdeploy.providers.gcp import GcpClients, GcpProvider, GcpSettings  # noqa: E402


class StorageCounter:
    """Counts the storage client's HTTP requests and the bytes it uploads."""

    def __init__(self, client):
        self.requests = 0
        self.uploaded = 0
        session = client._http
        original = session.request

        def request(method, url, data=None, *args, **kwargs):
            self.requests += 1
            if "/upload/" in url and data is not None:
                self.uploaded += len(data) if isinstance(data, (bytes, bytearray)) else 0
            return original(method, url, data, *args, **kwargs)

        session.request = request


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", action="store_true", help="run each revision as a local process")
    parser.add_argument("--detail", action="store_true", help="also print each case's API requests by method")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    emulator = GCSEmulator(work / "gcs").start()
    cloud = FakeGoogleCloud(runner=args.runner, storage_url=emulator.url, workdir=work / "fakes").start()
    try:
        directory = work / "sentiment"
        create(directory)
        clients = GcpClients.from_env(cloud.env, "bench-project")
        counter = StorageCounter(clients.storage)
        provider = GcpProvider(clients, polling=FAST_POLLING, poll_interval=0.2)
        settings = GcpSettings(project="bench-project", region="us-central1", service="sentiment", min_instances=0)
        rows = []
        for label, change in (("first deploy", None), ("unchanged redeploy", None),
                              ("code-change redeploy", "\n# a one-line change\n")):
            if change:
                (directory / "model.py").write_text((directory / "model.py").read_text() + change)
            cloud.log.clear()
            before_requests, before_bytes = counter.requests, counter.uploaded
            started = time.perf_counter()
            bundle = SourceBundle.from_directory(directory)
            result = provider.deploy(settings, bundle)
            wall = time.perf_counter() - started
            summary = cloud.log.summary()
            storage_requests = counter.requests - before_requests
            if args.detail:
                methods = ", ".join(f"{m} {n}" for m, n in sorted(summary["by_method"].items()))
                print(f"{label}: {methods}; Cloud Storage {storage_requests}", file=sys.stderr)
            rows.append((label, summary["requests"] + storage_requests, summary["requests"], storage_requests,
                         summary["mutating"], counter.uploaded - before_bytes,
                         cloud.log.count(api="cloudbuild", method="CreateBuild"), result.revision, wall))
        print(f"{'deploy':<22}{'requests':>9}{'(APIs':>7}{'+GCS)':>6}{'writes':>8}{'uploaded':>10}{'builds':>8}"
              f"  {'revision':<24}{'wall s':>7}")
        for label, total, apis, gcs, writes, uploaded, builds, revision, wall in rows:
            print(f"{label:<22}{total:>9}{apis:>7}{gcs:>6}{writes:>8}{uploaded:>10}{builds:>8}  {revision:<24}{wall:>7.2f}")
        print("reference gcloud run deploy --source: ~23 requests first deploy; ~19 requests, full upload and "
              "full rebuild on an unchanged redeploy")
    finally:
        cloud.stop()
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
