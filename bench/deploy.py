"""`deploy gcp` cost against the Google API fakes: requests, bytes uploaded, builds, wall time.

    python bench/deploy.py [--runner] [--training service|job|both]

Three deploys of a freshly created backend (default blueprint) to the fakes (tests/fakes) with a
real fake-gcs-server for Cloud Storage: the first deploy, an unchanged redeploy, and a redeploy
after a one-line code change. Requests are every call the deploy made: the four control-plane
APIs (the fakes' request log, operation polls included) plus Cloud Storage (counted on the
storage client's HTTP session; the fake build service's own log writes are not ours and are not
counted). Bytes uploaded are the request bodies of Cloud Storage uploads. With --runner the Cloud
Run fake starts each revision as a local process (wall time then includes its start-up).
`--training job` deploys with the training job (`deploy gcp --training job`: the job is read,
created or updated, and its IAM policy read and granted); `--training both` runs the default
(`service`) and `job` side by side, each on its own service, and prints the job's extra requests.

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


def run_cases(cloud, work: Path, training: str, detail: bool) -> list:
    """First deploy, unchanged redeploy, code-change redeploy of a new backend with `training`."""
    directory = work / "sentiment"
    create(directory)
    clients = GcpClients.from_env(cloud.env, "bench-project")
    counter = StorageCounter(clients.storage)
    provider = GcpProvider(clients, polling=FAST_POLLING, poll_interval=0.2)
    settings = GcpSettings(project="bench-project", region="us-central1", service="sentiment",
                           min_instances=0, training=training)
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
        # requests on the job itself (Get/Create/UpdateJob, its IAM policy); its operation polls count in APIs
        job_requests = sum(1 for e in cloud.log.entries
                           if e.api == "run" and ("/jobs/" in e.path or e.path.endswith("/jobs")))
        if detail:
            methods = ", ".join(f"{m} {n}" for m, n in sorted(summary["by_method"].items()))
            print(f"{label} ({training}): {methods}; Cloud Storage {storage_requests}", file=sys.stderr)
        rows.append((label, summary["requests"] + storage_requests, summary["requests"], storage_requests,
                     summary["mutating"], job_requests, counter.uploaded - before_bytes,
                     cloud.log.count(api="cloudbuild", method="CreateBuild"), result.revision, wall))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runner", action="store_true", help="run each revision as a local process")
    parser.add_argument("--detail", action="store_true", help="also print each case's API requests by method")
    parser.add_argument("--training", choices=("service", "job", "both"), default="service",
                        help="deploy with --training service (default), job, or both side by side")
    args = parser.parse_args(argv)
    modes = ("service", "job") if args.training == "both" else (args.training,)
    tables = {}
    for mode in modes:  # each on fresh fakes: a first deploy creates the shared repository and buckets
        work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
        emulator = GCSEmulator(work / "gcs").start()
        cloud = FakeGoogleCloud(runner=args.runner, storage_url=emulator.url, workdir=work / "fakes").start()
        try:
            tables[mode] = run_cases(cloud, work, mode, args.detail)
        finally:
            cloud.stop()
            emulator.stop()
    print(f"{'deploy':<22}{'training':>9}{'requests':>9}{'(APIs':>7}{'+GCS)':>6}{'writes':>8}{'job reqs':>9}"
          f"{'uploaded':>10}{'builds':>8}  {'revision':<24}{'wall s':>7}")
    for mode, rows in tables.items():
        for label, total, apis, gcs, writes, jobs, uploaded, builds, revision, wall in rows:
            print(f"{label:<22}{mode:>9}{total:>9}{apis:>7}{gcs:>6}{writes:>8}{jobs:>9}{uploaded:>10}{builds:>8}  "
                  f"{revision:<24}{wall:>7.2f}")
    if len(tables) == 2:
        for (label, total, *_), (_, job_total, *__) in zip(tables["service"], tables["job"]):
            print(f"{label}: --training job makes {job_total - total:+d} requests "
                  f"({job_total / total:.2f}x the service-only deploy)")
    print("reference gcloud run deploy --source: ~23 requests first deploy; ~19 requests, full upload and "
          "full rebuild on an unchanged redeploy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
