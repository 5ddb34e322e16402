"""Artifact Registry v1 fake: Docker repositories, images, packages, versions and tags.

Images get here only through the Cloud Build fake's "push" (`push()`), which also remembers the
source bundle each image was built from, so the Cloud Run fake can run an image as a process, and,
when the build was real (a container engine), the engine's image (`Image.local`, whose id is the
digest) and its size, so the Cloud Run fake can run the image itself.

Resource names follow the real API:
  repository  projects/P/locations/L/repositories/R                      (format DOCKER)
  package     .../repositories/R/packages/IMAGE      (a "/" in IMAGE is written %2F)
  version     .../packages/IMAGE/versions/sha256:HEX
  tag         .../packages/IMAGE/tags/TAG            -> version
  dockerImage .../repositories/R/dockerImages/IMAGE@sha256:HEX
  image uri   L-docker.pkg.dev/P/R/IMAGE@sha256:HEX
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from google.cloud import artifactregistry_v1 as ar
from google.protobuf import empty_pb2

from .iam import Policies
from .server import (already_exists, failed_precondition, invalid_argument, not_found, now_pb, paginate,
                     routes_from_transport)

Repository = ar.Repository.pb()
DockerImage = ar.DockerImage.pb()
Package = ar.Package.pb()
Version = ar.Version.pb()
Tag = ar.Tag.pb()
OperationMetadata = ar.OperationMetadata.pb()

REPOSITORY_ID = re.compile(r"[a-z]([a-z0-9-]{0,61}[a-z0-9])?")
IMAGE_REF = re.compile(r"(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/(?P<repo>[^/]+)/"
                       r"(?P<image>[^:@]+)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
TAG = re.compile(r"[\w][\w.-]{0,127}")


class PushError(Exception):
    """Why a push failed (what the build log and failureInfo report)."""


@dataclass
class Image:
    repository: str  # repository resource name
    package: str  # image path inside the repository, e.g. "svc" or "team/svc"
    digest: str  # "sha256:..."
    bundle: bytes  # the source bundle it was built from
    dockerfile: str = "Dockerfile"
    build_id: str = ""
    size: int = 0
    tags: set = field(default_factory=set)
    upload_time: object = None
    local: str = ""  # the container engine's image id, when a real build made it ("" on paper)

    @property
    def location_project_repo(self):
        parts = self.repository.split("/")
        return parts[3], parts[1], parts[5]

    @property
    def uri(self) -> str:
        location, project, repo = self.location_project_repo
        return f"{location}-docker.pkg.dev/{project}/{repo}/{self.package}@{self.digest}"

    @property
    def package_name(self) -> str:
        return f"{self.repository}/packages/{self.package.replace('/', '%2F')}"

    @property
    def version_name(self) -> str:
        return f"{self.package_name}/versions/{self.digest}"

    @property
    def docker_image_name(self) -> str:
        return f"{self.repository}/dockerImages/{self.package.replace('/', '%2F')}@{self.digest}"


def parse_image(ref: str) -> dict | None:
    """`L-docker.pkg.dev/P/R/IMAGE[:TAG][@sha256:...]` -> its parts (None for other registries)."""
    m = IMAGE_REF.match(ref)
    return m.groupdict() if m else None


class ArtifactRegistryFake:
    api = "artifactregistry"

    def __init__(self, cloud):
        self.cloud = cloud
        self.repositories: dict[str, object] = {}
        self.images: list[Image] = []
        server = cloud.server
        server.add_routes(routes_from_transport(
            self.api, "google.cloud.artifactregistry_v1.services.artifact_registry.transports.rest",
            "ArtifactRegistryRestTransport"))
        for method in ("GetRepository", "CreateRepository", "ListRepositories", "DeleteRepository",
                       "ListDockerImages", "GetDockerImage", "ListPackages", "GetPackage", "DeletePackage",
                       "ListVersions", "GetVersion", "DeleteVersion", "BatchDeleteVersions", "ListTags", "GetTag",
                       "CreateTag", "UpdateTag", "DeleteTag", "GetIamPolicy", "SetIamPolicy", "TestIamPermissions"):
            server.handle(self.api, method)(getattr(self, method))
        self.policies = Policies(cloud)  # repository name -> google.iam.v1.Policy

    # ---- IAM on repositories ----------------------------------------------------------------
    def _repository(self, name: str):
        if name not in self.repositories:
            raise not_found("Requested entity was not found.")
        return name

    def GetIamPolicy(self, request, ctx):
        return self.policies.get(self._repository(request.resource))

    def SetIamPolicy(self, request, ctx):
        return self.policies.set(self._repository(request.resource), request)

    def TestIamPermissions(self, request, ctx):
        self._repository(request.resource)
        return self.policies.test(request.permissions)

    def can_push(self, repository: str, member: str) -> bool:
        """Whether `member` may push to `repository` (roles/artifactregistry.writer or above, propagated)."""
        return self.policies.grants(repository, member, (
            "roles/artifactregistry.writer", "roles/artifactregistry.repoAdmin", "roles/artifactregistry.admin"))

    # ---- used by the other fakes and by tests ------------------------------------------------
    def add_repository(self, project: str, location: str, repository_id: str, fmt: str = "DOCKER"):
        """Create a repository directly (test setup), bypassing the API and its log."""
        name = f"projects/{project}/locations/{location}/repositories/{repository_id}"
        repo = Repository(name=name, format_=Repository.Format.Value(fmt), mode=Repository.Mode.STANDARD_REPOSITORY)
        now_pb(repo.create_time)
        now_pb(repo.update_time)
        self.repositories[name] = repo
        return repo

    def push(self, ref: str, digest: str, bundle: bytes, dockerfile: str = "Dockerfile", build_id: str = "",
             local: str = "", size: int = 0) -> Image:
        """Store an image under `ref`'s tag (and digest). Raises PushError like a registry would.
        `local`: the engine's image id of a real build; `size`: its size (else the bundle's)."""
        parts = parse_image(ref)
        if parts is None:
            raise PushError(f"the fake only hosts Artifact Registry Docker images (LOCATION-docker.pkg.dev/...), "
                            f"not {ref!r}")
        repository = f"projects/{parts['project']}/locations/{parts['location']}/repositories/{parts['repo']}"
        repo = self.repositories.get(repository)
        if repo is None:
            raise PushError(f'name unknown: Repository "{parts["repo"]}" not found')
        if repo.format_ != Repository.Format.DOCKER:
            raise PushError(f'repository "{parts["repo"]}" is not a Docker repository')
        image = self.find(repository, parts["image"], digest)
        if image is None:
            image = Image(repository, parts["image"], digest, bundle, dockerfile, build_id, size=size or len(bundle),
                          local=local)
            image.upload_time = now_pb()
            self.images.append(image)
        tag = parts["tag"] or ("latest" if not parts["digest"] else None)
        if tag:
            for other in self.images:  # a tag names one version: moving it takes it from the old one
                if other.repository == repository and other.package == parts["image"]:
                    other.tags.discard(tag)
            image.tags.add(tag)
        return image

    def find(self, repository: str, package: str, digest: str) -> Image | None:
        for image in self.images:
            if image.repository == repository and image.package == package and image.digest == digest:
                return image
        return None

    def resolve(self, ref: str) -> Image | None:
        """The stored image `ref` points at (by digest, else by tag), or None."""
        parts = parse_image(ref)
        if parts is None:
            return None
        repository = f"projects/{parts['project']}/locations/{parts['location']}/repositories/{parts['repo']}"
        for image in self.images:
            if image.repository != repository or image.package != parts["image"]:
                continue
            if parts["digest"]:
                if image.digest == parts["digest"]:
                    return image
            elif (parts["tag"] or "latest") in image.tags:
                return image
        return None

    # ---- helpers -------------------------------------------------------------------------
    def _repo(self, name: str):
        repo = self.repositories.get(name)
        if repo is None:
            raise not_found("Requested entity was not found.")
        return repo

    def _images_in(self, repository: str, package: str | None = None) -> list[Image]:
        self._repo(repository)
        return [i for i in self.images if i.repository == repository
                and (package is None or i.package.replace("/", "%2F") == package)]

    def _split_package(self, name: str) -> tuple[str, str]:
        """`.../repositories/R/packages/PKG[/...]` -> (repository name, PKG)."""
        m = re.match(r"(projects/[^/]+/locations/[^/]+/repositories/[^/]+)/packages/([^/]+)", name)
        if not m:
            raise invalid_argument(f"Invalid resource name: {name}")
        return m.group(1), m.group(2)

    def _docker_image(self, image: Image):
        message = DockerImage(name=image.docker_image_name, uri=image.uri, tags=sorted(image.tags),
                              image_size_bytes=image.size,
                              media_type="application/vnd.docker.distribution.manifest.v2+json")
        message.upload_time.CopyFrom(image.upload_time)
        message.build_time.CopyFrom(image.upload_time)
        message.update_time.CopyFrom(image.upload_time)
        return message

    def _version(self, image: Image, full: bool):
        message = Version(name=image.version_name)
        message.create_time.CopyFrom(image.upload_time)
        message.update_time.CopyFrom(image.upload_time)
        if full:
            for tag in sorted(image.tags):
                message.related_tags.add(name=f"{image.package_name}/tags/{tag}", version=image.version_name)
        return message

    def _lro(self, response):
        name = f"{response.name.split('/repositories/')[0]}/operations/{self.cloud.server.operation_id()}"
        return self.cloud.server.new_operation(name, self.api, OperationMetadata, lambda: response).to_pb()

    # ---- repositories --------------------------------------------------------------------
    def GetRepository(self, request, ctx):
        return self._repo(request.name)

    def ListRepositories(self, request, ctx):
        repos = [r for n, r in sorted(self.repositories.items()) if n.startswith(request.parent + "/")]
        page, token = paginate(repos, request.page_size, request.page_token)
        return ar.ListRepositoriesResponse.pb()(repositories=page, next_page_token=token)

    def CreateRepository(self, request, ctx):
        if not REPOSITORY_ID.fullmatch(request.repository_id):
            raise invalid_argument(
                f"Invalid repository id {request.repository_id!r}: it must start with a lowercase letter, contain only "
                f"lowercase letters, numbers and hyphens, end with a letter or number, and be at most 63 "
                f"characters.", "repository_id")
        if request.repository.format_ == Repository.Format.FORMAT_UNSPECIFIED:
            raise invalid_argument("Repository format must be specified.", "repository.format")
        name = f"{request.parent}/repositories/{request.repository_id}"
        if name in self.repositories:
            raise already_exists("the repository already exists")
        repo = Repository()
        repo.CopyFrom(request.repository)
        repo.name = name
        repo.registry_uri = f"{request.parent.split('/')[3]}-docker.pkg.dev/{request.parent.split('/')[1]}/" \
                            f"{request.repository_id}"
        if repo.mode == Repository.Mode.MODE_UNSPECIFIED:
            repo.mode = Repository.Mode.STANDARD_REPOSITORY
        now_pb(repo.create_time)
        now_pb(repo.update_time)
        self.repositories[name] = repo
        return self._lro(repo)

    def DeleteRepository(self, request, ctx):
        self._repo(request.name)
        del self.repositories[request.name]
        self.images = [i for i in self.images if i.repository != request.name]
        name = f"{request.name.split('/repositories/')[0]}/operations/{self.cloud.server.operation_id()}"
        return self.cloud.server.new_operation(name, self.api, OperationMetadata, empty_pb2.Empty).to_pb()

    # ---- docker images ---------------------------------------------------------------------
    def ListDockerImages(self, request, ctx):
        images = self._images_in(request.parent)
        order = request.order_by.strip()
        if order:
            key, _, direction = order.partition(" ")
            if key not in ("update_time", "upload_time", "build_time", "name", "media_type", "image_size_bytes"):
                raise invalid_argument(f"Invalid order_by: {request.order_by}", "order_by")
            images = sorted(images, key=lambda i: (i.upload_time.seconds, i.upload_time.nanos, i.docker_image_name),
                            reverse=direction.strip().lower() == "desc")
        page, token = paginate([self._docker_image(i) for i in images], request.page_size, request.page_token)
        return ar.ListDockerImagesResponse.pb()(docker_images=page, next_page_token=token)

    def GetDockerImage(self, request, ctx):
        m = re.match(r"(.+/repositories/[^/]+)/dockerImages/([^@]+)@(sha256:[0-9a-f]+)$", request.name)
        if not m:
            raise invalid_argument(f"Invalid docker image name: {request.name}", "name")
        for image in self._images_in(m.group(1)):
            if image.package.replace("/", "%2F") == m.group(2) and image.digest == m.group(3):
                return self._docker_image(image)
        raise not_found("Requested entity was not found.")

    # ---- packages, versions, tags --------------------------------------------------------
    def ListPackages(self, request, ctx):
        packages = sorted({i.package for i in self._images_in(request.parent)})
        messages = []
        for package in packages:
            images = [i for i in self.images if i.repository == request.parent and i.package == package]
            p = Package(name=f"{request.parent}/packages/{package.replace('/', '%2F')}", display_name=package)
            p.create_time.CopyFrom(min(images, key=lambda i: i.upload_time.ToNanoseconds()).upload_time)
            p.update_time.CopyFrom(max(images, key=lambda i: i.upload_time.ToNanoseconds()).upload_time)
            messages.append(p)
        page, token = paginate(messages, request.page_size, request.page_token)
        return ar.ListPackagesResponse.pb()(packages=page, next_page_token=token)

    def GetPackage(self, request, ctx):
        repository, package = self._split_package(request.name)
        images = self._images_in(repository, package)
        if not images:
            raise not_found("Requested entity was not found.")
        return Package(name=request.name, display_name=images[0].package)

    def DeletePackage(self, request, ctx):
        repository, package = self._split_package(request.name)
        if not self._images_in(repository, package):
            raise not_found("Requested entity was not found.")
        self.images = [i for i in self.images
                       if not (i.repository == repository and i.package.replace("/", "%2F") == package)]
        name = f"{repository.split('/repositories/')[0]}/operations/{self.cloud.server.operation_id()}"
        return self.cloud.server.new_operation(name, self.api, OperationMetadata, empty_pb2.Empty).to_pb()

    def ListVersions(self, request, ctx):
        repository, package = self._split_package(request.parent)
        images = self._images_in(repository, package)
        order = request.order_by.strip()
        if order:
            key, _, direction = order.partition(" ")
            if key not in ("create_time", "update_time", "name"):
                raise invalid_argument(f"Invalid order_by: {request.order_by}", "order_by")
            images = sorted(images, key=lambda i: (i.upload_time.ToNanoseconds(), i.digest),
                            reverse=direction.strip().lower() == "desc")
        full = request.view == ar.VersionView.FULL
        page, token = paginate([self._version(i, full) for i in images], request.page_size, request.page_token)
        return ar.ListVersionsResponse.pb()(versions=page, next_page_token=token)

    def _image_for_version(self, name: str) -> Image:
        repository, package = self._split_package(name)
        digest = name.rsplit("/versions/", 1)[-1]
        for image in self._images_in(repository, package):
            if image.digest == digest:
                return image
        raise not_found("Requested entity was not found.")

    def GetVersion(self, request, ctx):
        return self._version(self._image_for_version(request.name), request.view == ar.VersionView.FULL)

    def DeleteVersion(self, request, ctx):
        image = self._image_for_version(request.name)
        if image.tags and not request.force:
            raise failed_precondition(f"Version {request.name} has tags: set force to delete it and its tags.")
        self.images.remove(image)
        name = f"{image.repository.split('/repositories/')[0]}/operations/{self.cloud.server.operation_id()}"
        return self.cloud.server.new_operation(name, self.api, OperationMetadata, empty_pb2.Empty).to_pb()

    def BatchDeleteVersions(self, request, ctx):
        images = [self._image_for_version(n) for n in request.names]
        if not request.validate_only:
            for image in images:
                self.images.remove(image)
        name = f"{request.parent.split('/repositories/')[0]}/operations/{self.cloud.server.operation_id()}"
        return self.cloud.server.new_operation(name, self.api, OperationMetadata, empty_pb2.Empty).to_pb()

    def ListTags(self, request, ctx):
        repository, package = self._split_package(request.parent)
        images = self._images_in(repository, package)
        wanted = None
        if request.filter:
            m = re.fullmatch(r'\s*version\s*=\s*"([^"]+)"\s*', request.filter)
            if not m:
                raise invalid_argument(f"Invalid filter: {request.filter}", "filter")
            wanted = m.group(1)
        tags = [Tag(name=f"{request.parent}/tags/{t}", version=i.version_name)
                for i in images for t in sorted(i.tags) if wanted is None or i.version_name == wanted]
        tags.sort(key=lambda t: t.name)
        page, token = paginate(tags, request.page_size, request.page_token)
        return ar.ListTagsResponse.pb()(tags=page, next_page_token=token)

    def GetTag(self, request, ctx):
        repository, package = self._split_package(request.name)
        tag = request.name.rsplit("/tags/", 1)[-1]
        for image in self._images_in(repository, package):
            if tag in image.tags:
                return Tag(name=request.name, version=image.version_name)
        raise not_found("Requested entity was not found.")

    def CreateTag(self, request, ctx):
        if not TAG.fullmatch(request.tag_id):
            raise invalid_argument(f"Invalid tag id: {request.tag_id!r}", "tag_id")
        repository, package = self._split_package(request.parent)
        image = self._image_for_version(request.tag.version)
        for other in self._images_in(repository, package):
            if request.tag_id in other.tags:
                raise already_exists(f"Tag {request.tag_id} already exists.")
        image.tags.add(request.tag_id)
        return Tag(name=f"{request.parent}/tags/{request.tag_id}", version=image.version_name)

    def UpdateTag(self, request, ctx):
        repository, package = self._split_package(request.tag.name)
        tag = request.tag.name.rsplit("/tags/", 1)[-1]
        image = self._image_for_version(request.tag.version)
        for other in self._images_in(repository, package):
            other.tags.discard(tag)
        image.tags.add(tag)
        return Tag(name=request.tag.name, version=image.version_name)

    def DeleteTag(self, request, ctx):
        repository, package = self._split_package(request.name)
        tag = request.name.rsplit("/tags/", 1)[-1]
        for image in self._images_in(repository, package):
            if tag in image.tags:
                image.tags.discard(tag)
                return empty_pb2.Empty()
        raise not_found("Requested entity was not found.")


__all__ = ["ArtifactRegistryFake", "Image", "PushError", "parse_image"]
