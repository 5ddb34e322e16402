"""Pruning after a deploy: a service keeps the newest `keep_images` images in Artifact Registry
(and images of revisions that serve traffic, whatever their age), the source bundles of the
images it keeps, and its newest `keep_images` build logs. The rest is deleted."""
from __future__ import annotations

from ..base import _quiet
from .errors import google_error
from .service import list_revisions, traffic_targets
from .storage import delete_blobs, list_blobs


def serving_images(api, settings, live) -> set:
    """Digests of the images of revisions that receive traffic (never pruned)."""
    if live is None:
        return set()
    serving = {t["revision"] for t in traffic_targets(live) if t["percent"]}
    return {rev.containers[0].image.rsplit("@", 1)[-1] for rev in list_revisions(api, settings)
            if rev.name.rsplit("/", 1)[-1] in serving and rev.containers and "@" in rev.containers[0].image}


def prune_candidates(api, settings, keep_digests: set, new_image: bool = False, bundle=None) -> tuple:
    """([(version name, digest)], [blob]) a prune would delete: images of the service beyond the
    newest `keep_images` (counting an image this deploy is about to build) other than ones that
    serve traffic, the uploaded source bundles of images not kept, and build logs beyond the
    newest `keep_images`."""
    from google.api_core import exceptions as gexc
    from google.cloud import artifactregistry_v1 as ar

    package = f"{settings.repository_name}/packages/{settings.service}"
    try:
        versions = list(api.clients.registry.list_versions(request=ar.ListVersionsRequest(
            parent=package, view=ar.VersionView.FULL, order_by="create_time desc", page_size=500)))
    except gexc.NotFound:
        versions = []
    except gexc.GoogleAPICallError as exc:
        raise google_error(exc, "artifactregistry", "listing the images of", package, settings.project) from None
    # newest first whatever order the server kept
    versions.sort(key=lambda v: (v.create_time.timestamp() if v.create_time else 0, v.name), reverse=True)
    keep = max(settings.keep_images - (1 if new_image else 0), 0)
    kept_sources = {bundle.digest} if bundle is not None else set()
    doomed = []
    for index, version in enumerate(versions):
        digest = version.name.rsplit("/", 1)[-1]
        sources = {t.name.rsplit("/tags/src-", 1)[-1] for t in version.related_tags if "/tags/src-" in t.name}
        if index < keep or digest in keep_digests:
            kept_sources |= sources
        else:
            doomed.append((version.name, digest))
    blobs = [b for b in list_blobs(api, settings, settings.sources_bucket_name, f"sources/{settings.service}/")
             if b.name.rsplit("/", 1)[-1].removesuffix(".tar.gz") not in kept_sources]
    # build logs: the newest `keep_images` (a failed build's log included) stay
    logs = list_blobs(api, settings, settings.sources_bucket_name, settings.logs_prefix)
    logs.sort(key=lambda b: (b.time_created.timestamp() if b.time_created else 0, b.name), reverse=True)
    return doomed, blobs + logs[keep:]


def prune(api, settings, keep_digests: set, bundle=None, progress=_quiet) -> list:
    """Delete old images, source bundles and build logs of the service (see prune_candidates);
    returns what went."""
    from google.api_core import exceptions as gexc

    images, blobs = prune_candidates(api, settings, keep_digests, bundle=bundle)
    if not images and not blobs:
        return []
    progress(f"pruning {len(images)} old image(s) and {len(blobs)} source bundle(s)/build log(s) of {settings.service} "
             f"(keeping the newest {settings.keep_images})")
    deleted = []
    for name, digest in images:
        try:
            # force: the src-<digest> tag goes with its version
            api.result(api.clients.registry.delete_version(request={"name": name, "force": True}), 300,
                       f"deleting image {name}")
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            raise google_error(exc, "artifactregistry", "deleting image", name, settings.project) from None
        deleted.append(f"image {settings.image}@{digest}")
    delete_blobs(api, settings, settings.sources_bucket_name, blobs)
    deleted += [f"gs://{settings.sources_bucket_name}/{blob.name}" for blob in blobs]
    return deleted
