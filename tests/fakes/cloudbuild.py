"""Cloud Build v1 fake: builds (create global and regional, get, list, cancel) and their operations.

With a container engine (`FakeGoogleCloud(engine=...)`) the docker steps run for real on the
uploaded bundle, on a thread of their own (cloudbuild_steps.py); without one, a build is simulated
step by step with the same inputs and outcomes a real one has:

- FETCHSOURCE: the `source.storageSource` object is read from Cloud Storage (the fake-gcs-server
  emulator, or the in-memory store) and must be a tar.gz (or zip) archive. A missing object is
  rejected by CreateBuild itself ("could not resolve source"), like the real API does. With the
  emulator, the build's account must hold storage.objects.get on the bucket (a propagated bucket
  binding, storage_iam.py, or project-wide access), else FETCH_SOURCE_FAILED with Google's 403.
- `docker build` steps check the context has the Dockerfile and "build" an image whose digest is
  derived only from the context's files (same files -> same digest); `docker tag`, `docker push`,
  `docker pull` (for `--cache-from`) and the build's `images` behave like a Docker daemon would;
  a push goes to the Artifact Registry fake (the repository must exist). Any other step is
  recorded and succeeds.
- The build is QUEUED in CreateBuild's answer, WORKING after the first poll (GetBuild, ListBuilds
  or GetOperation all count) and finished after `operation_polls` polls (`polls_to_finish` to change
  it for builds only: more polls, more log chunks).
- Logs: the full log text is written to `gs://<logsBucket>/log-<buildId>.txt` and grows as the
  build advances (ranged reads from the last offset stream it, as gcloud does). When the request
  sets no logs bucket, the fake fills in the default `gs://<project number>.cloudbuild-logs.
  googleusercontent.com` like the real API, and then only keeps the log in memory
  (`CloudBuildFake.log_text(build_id)`), as that bucket is Google's.
- Faults: `fail_next(step=..., message=..., log_lines=[...])` makes the next build fail at a step.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

from google.cloud.devtools import cloudbuild_v1 as cb
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2

from .artifactregistry import PushError
from .cloudbuild_steps import BuildSteps, BuildTimeout
from .runner import bundle_files
from .server import (ApiError, Route, compile_template, failed_precondition, invalid_argument, not_found, now_pb,
                     paginate, permission_denied_error, project_number, routes_from_transport)

Build = cb.Build.pb()
BuildStep = cb.BuildStep.pb()
BuildOperationMetadata = cb.BuildOperationMetadata.pb()
Status = Build.Status
FailureType = Build.FailureInfo.FailureType
LoggingMode = cb.BuildOptions.pb().LoggingMode

@dataclass
class PlannedFailure:
    step: int
    message: str
    log_lines: list[str]
    exit_code: int = 1


@dataclass
class BuildRecord:
    build: object  # the Build message (live)
    location: str
    bundle: bytes | None
    lines: list[str] = field(default_factory=list)  # the complete log, computed at creation
    final: object = None  # the finished Build (status, steps, results...) revealed at the end
    polls: int = 0
    revealed: int = 0  # log lines revealed so far
    pushed: list = field(default_factory=list)  # artifactregistry Images pushed
    cache_from: list = field(default_factory=list)  # (ref, found?) for every --cache-from
    operation: str = ""
    identity: str = ""  # the service account the build runs as
    engine_images: list = field(default_factory=list)  # image ids a real build made (cloud.engine)
    engine_log: list = field(default_factory=list)  # the engine's own build output
    deadline: float = 0.0  # time.monotonic() past which the build is TIMEOUT (its `timeout` from the start)


# Where Cloud Build still runs builds for a restricted project (cloud.google.com/build/docs/locations)
OPEN_BUILD_REGIONS = ("us-central1", "us-west2", "europe-west1", "asia-east1", "australia-southeast1",
                      "southamerica-east1")


class CloudBuildFake:
    api = "cloudbuild"

    def __init__(self, cloud):
        self.cloud = cloud
        self.builds: dict[str, BuildRecord] = {}
        self.failures: list[PlannedFailure] = []
        self.polls_to_finish: int | None = None  # polls a build needs (default: the server's operation_polls)
        self.time_out_next_build = False  # time_out_next(): the next build runs past its timeout
        # restrict_regions(): like a new or low-usage project, builds only in these regions (None: anywhere)
        self.open_regions: tuple[str, ...] | None = None
        # who builds without build.service_account: "legacy" (NUMBER@cloudbuild...) or "compute" (new projects)
        self.default_identity = "legacy"
        self.steps = BuildSteps(cloud)  # the steps, as a Docker daemon runs them
        server = cloud.server
        server.add_routes(routes_from_transport(
            self.api, "google.cloud.devtools.cloudbuild_v1.services.cloud_build.transports.rest",
            "CloudBuildRestTransport"))
        # The operations client is configured in the transport, not in rest_base: add its two paths.
        routes = []
        for template in ("/v1/{name=operations/**}", "/v1/{name=projects/*/locations/*/operations/*}"):
            regex, variables, has_verb = compile_template(template)
            routes.append(Route(self.api, "GetOperation", "GET", template, regex, variables, None,
                                operations_pb2.GetOperationRequest, operations_pb2.Operation, has_verb))
        server.add_routes(routes)
        for method in ("CreateBuild", "GetBuild", "ListBuilds", "CancelBuild"):
            server.handle(self.api, method)(getattr(self, method))

    # ---- faults and inspection ---------------------------------------------------------------
    def fail_next(self, step: int = 0, message: str = "step exited with non-zero status: 1",
                  log_lines: list[str] | None = None, exit_code: int = 1) -> None:
        """The next build fails at step `step` with `log_lines` in its log (then builds run normally)."""
        self.failures.append(PlannedFailure(step, message, list(log_lines or [
            "ERROR: Could not find a version that satisfies the requirement not-a-package==0.0",
            "ERROR: No matching distribution found for not-a-package==0.0"]), exit_code))

    def time_out_next(self) -> None:
        """The next build's first step runs past the build's `timeout` (a build on paper takes no
        time; with an engine, builds time out for real)."""
        self.time_out_next_build = True

    def log_text(self, build_id: str) -> str:
        record = self.builds[build_id]
        return "".join(line + "\n" for line in record.lines[:record.revealed])

    def record(self, build_id: str) -> BuildRecord:
        return self.builds[build_id]

    # ---- names -------------------------------------------------------------------------------
    def _find(self, name: str = "", project_id: str = "", build_id: str = "") -> BuildRecord:
        if name:
            m = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)/builds/([^/]+)", name)
            if not m:
                raise invalid_argument(f"Invalid build name: {name}", "name")
            project_id, location, build_id = m.groups()
        else:
            location = "global"
        record = self.builds.get(build_id)
        if record is None or project_number(record.build.project_id) != project_number(project_id) \
                or record.location != location:
            raise not_found("Requested entity was not found.")
        return record

    def restrict_regions(self, regions=OPEN_BUILD_REGIONS) -> None:
        """Refuse regional builds elsewhere, as Cloud Build does for some new or low-usage projects."""
        self.open_regions = tuple(regions)

    # ---- create ------------------------------------------------------------------------------
    def CreateBuild(self, request, ctx):
        if re.fullmatch(r"/v1/projects/[^/]+/builds", ctx.entry.path.split("?")[0]):
            # the legacy path creates the build in the global region, whatever `parent` says
            project, location = request.project_id, "global"
        elif request.parent:
            m = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)", request.parent)
            project, location = m.groups()
            if request.project_id and request.project_id != project:
                raise invalid_argument("project_id does not match the parent.", "project_id")
        else:
            project, location = request.project_id, "global"
        if self.open_regions is not None and location != "global" and location not in self.open_regions:
            raise failed_precondition("due to quota restrictions, cannot run builds in this region")
        identity = self._identity(request.build, project)
        build = Build()
        build.CopyFrom(request.build)
        self._validate(build)
        build_id = str(uuid.uuid4())
        substitutions = self._substitutions(build, project, location, build_id)
        self._substitute(build, substitutions)

        bundle = None
        if build.source.HasField("storage_source"):
            src = build.source.storage_source
            bundle = self.cloud.storage.get(src.bucket, src.object_, src.generation or None)
            if bundle is None and self.cloud.storage.enabled:
                raise invalid_argument(
                    f"could not resolve source: googleapi: Error 404: No such object: {src.bucket}/{src.object_}, "
                    f"notFound")
        elif build.source.ListFields():
            raise invalid_argument("The lsdeploy fake only builds storage_source sources.", "build.source")

        build.id = build_id
        build.name = f"projects/{project_number(project)}/locations/{location}/builds/{build_id}"
        build.project_id = project
        build.status = Status.QUEUED
        now_pb(build.create_time)
        if not build.HasField("timeout"):
            build.timeout.CopyFrom(duration_pb2.Duration(seconds=600))
        if not build.HasField("queue_ttl"):
            build.queue_ttl.CopyFrom(duration_pb2.Duration(seconds=3600))
        if not build.logs_bucket and build.options.logging not in (LoggingMode.CLOUD_LOGGING_ONLY, LoggingMode.NONE):
            build.logs_bucket = f"gs://{project_number(project)}.cloudbuild-logs.googleusercontent.com"
        region = "" if location == "global" else f";region={location}"
        build.log_url = (f"https://console.cloud.google.com/cloud-build/builds{region}/{build_id}"
                         f"?project={project_number(project)}")
        for step in build.steps:
            step.status = Status.QUEUED
        record = BuildRecord(build, location, bundle, identity=identity)
        if self.cloud.engine is not None:  # a real build takes a while: the API answers meanwhile
            threading.Thread(target=self._execute_real, args=(record, substitutions), daemon=True,
                             name=f"build-{build_id}").start()
        else:
            record.final = self._execute(record, substitutions)
        self.builds[build_id] = record

        if location == "global":
            op_name = f"operations/build/{project}/{build_id}"
        else:
            op_name = f"projects/{project}/locations/{location}/operations/{build_id}"
        record.operation = op_name

        def check():
            if record.build.status == Status.SUCCESS:
                return record.build
            if record.build.status in (Status.FAILURE, Status.INTERNAL_ERROR, Status.TIMEOUT, Status.EXPIRED):
                return ApiError("UNKNOWN", "Build failed; check build logs for details")
            if record.build.status == Status.CANCELLED:
                return ApiError("CANCELLED", "Build was cancelled")
            return None

        operation = self.cloud.server.new_operation(
            op_name, self.api, lambda: BuildOperationMetadata(build=record.build), check, polls_needed=0,
            on_poll=lambda: self._tick(record))
        return operation.to_pb()

    def _validate(self, build) -> None:
        if not build.steps:
            raise invalid_argument("invalid build: build must have at least one step", "build.steps")
        if build.HasField("timeout") and not 0 < build.timeout.seconds + build.timeout.nanos / 1e9 <= 86400:
            raise invalid_argument("invalid build: timeout must be positive and at most 24h (86400s)",
                                   "build.timeout")
        ids = set()
        for index, step in enumerate(build.steps):
            if not step.name:
                raise invalid_argument(f"invalid build: invalid .steps field: build step {index} must specify name",
                                       f"build.steps[{index}].name")
            if step.id:
                if step.id in ids:
                    raise invalid_argument(f"invalid build: duplicate build step id {step.id!r}")
                ids.add(step.id)
            for dependency in step.wait_for:
                if dependency != "-" and dependency not in ids:
                    raise invalid_argument(f"invalid build: build step {index} depends on an unknown or later step "
                                           f"{dependency!r}")
        if build.service_account and not build.logs_bucket and \
                build.options.logging not in (LoggingMode.CLOUD_LOGGING_ONLY, LoggingMode.NONE) and \
                build.options.default_logs_bucket_behavior != \
                cb.BuildOptions.pb().DefaultLogsBucketBehavior.REGIONAL_USER_OWNED_BUCKET:
            raise invalid_argument(
                "generic::invalid_argument: if 'build.service_account' is specified, the build must either (a) "
                "specify 'build.logs_bucket', (b) use the REGIONAL_USER_OWNED_BUCKET "
                "build.options.default_logs_bucket_behavior option, or (c) use either CLOUD_LOGGING_ONLY / NONE "
                "logging options")
        for image in build.images:
            if not image:
                raise invalid_argument("invalid build: empty image name in images")

    @staticmethod
    def _substitutions(build, project: str, location: str, build_id: str) -> dict:
        values = {"PROJECT_ID": project, "BUILD_ID": build_id, "PROJECT_NUMBER": project_number(project),
                  "LOCATION": location}
        for key, value in build.substitutions.items():
            if not re.fullmatch(r"_[A-Z0-9_]+", key):
                raise invalid_argument(f"invalid build: invalid substitution key {key!r}: user-defined substitutions "
                                       f"must begin with an underscore and use only uppercase letters, numbers and "
                                       f"underscores")
            values[key] = value
        return values

    def _substitute(self, build, values: dict) -> None:
        loose = build.options.substitution_option == cb.BuildOptions.pb().SubstitutionOption.ALLOW_LOOSE

        def expand(text: str) -> str:
            def replace(m):
                if m.group(0) == "$$":
                    return "$"
                key = m.group(1) or m.group(2)
                if key in values:
                    return values[key]
                if key.startswith("_") and not loose:
                    raise invalid_argument(f'generic::invalid_argument: key in the template "{key}" is not matched '
                                           f"in the substitution data; substitutions = {dict(sorted(values.items()))}")
                return m.group(0)
            return re.sub(r"\$\$|\$\{([A-Z0-9_]+)\}|\$([A-Z_][A-Z0-9_]*)", replace, text)

        for step in build.steps:
            step.args[:] = [expand(a) for a in step.args]
            step.env[:] = [expand(e) for e in step.env]
            step.name = expand(step.name)
        build.images[:] = [expand(i) for i in build.images]

    # ---- simulated execution -----------------------------------------------------------------
    def _execute(self, record: BuildRecord, substitutions: dict):
        """Run the build to completion on paper: the finished Build and every log line."""
        final = Build()
        final.CopyFrom(record.build)
        lines = record.lines
        lines.append(f'starting build "{final.id}"')
        lines.append("")
        daemon: dict[str, tuple] = {}  # local tags -> (digest, bundle, dockerfile)
        failure = self.failures.pop(0) if self.failures else None
        time_out, self.time_out_next_build = self.time_out_next_build, False
        record.deadline = time.monotonic() + (final.timeout.seconds or 600)
        files = None
        if final.source.HasField("storage_source"):
            src = final.source.storage_source
            generation = f"#{src.generation}" if src.generation else ""
            lines.append("FETCHSOURCE")
            lines.append(f"Fetching storage object: gs://{src.bucket}/{src.object_}{generation}")
            denied = self._fetch_denied(record, src.bucket)
            if denied:
                lines.append(f"AccessDeniedException: 403 {denied}")
                return self._fail(final, lines, None, FailureType.FETCH_SOURCE_FAILED,
                                  f"failed to fetch source gs://{src.bucket}/{src.object_}{generation}: {denied}")
            if record.bundle is not None:
                try:
                    files = bundle_files(record.bundle)
                    lines.append(f"Copying gs://{src.bucket}/{src.object_}{generation}...")
                    lines.append(f"/ [1 files][{len(record.bundle)} B/{len(record.bundle)} B]")
                    lines.append(f"Operation completed over 1 objects/{len(record.bundle)} B.")
                except ValueError as exc:
                    lines.append(f"gzip: stdin: not in gzip format ({exc})")
                    return self._fail(final, lines, None, FailureType.FETCH_SOURCE_FAILED,
                                      f"failed to fetch source: unpacking gs://{src.bucket}/{src.object_}: {exc}")
        lines.append("BUILD")
        for index, step in enumerate(final.steps):
            prefix = f"Step #{index}" + (f' - "{step.id}"' if step.id else "")
            lines.append(f"Starting {prefix}")
            now_pb(step.timing.start_time)
            if failure is not None and failure.step == index:
                lines.extend(f"{prefix}: {line}" for line in failure.log_lines)
                step.exit_code = failure.exit_code
                return self._fail(final, lines, index, FailureType.USER_BUILD_STEP,
                                  f'Build step failure: build step {index} "{step.name}" failed: {failure.message}')
            if time_out:
                return self._time_out(final, lines, index)
            try:
                ok, step_lines = self.steps.run(record, step, files, daemon)
            except BuildTimeout as exc:
                lines.extend(f"{prefix}: {line}" for line in exc.lines)
                return self._time_out(final, lines, index)
            lines.extend(f"{prefix}: {line}" for line in step_lines)
            now_pb(step.timing.end_time)
            if not ok and not (step.allow_failure or 1 in step.allow_exit_codes):
                step.exit_code = 1
                return self._fail(final, lines, index, FailureType.USER_BUILD_STEP,
                                  f'Build step failure: build step {index} "{step.name}" failed: step exited with '
                                  f"non-zero status: 1")
            step.status = Status.SUCCESS if ok else Status.FAILURE
            final.results.build_step_images.append(
                "sha256:" + hashlib.sha256(f"builder:{step.name}".encode()).hexdigest())
            lines.append(f"Finished {prefix}")
        if final.images:
            lines.append("PUSH")
        for image_ref in final.images:
            local = daemon.get(image_ref) or daemon.get(image_ref + ":latest")
            if local is None:
                lines.append(f"ERROR: failed to find one or more images after execution of build steps: "
                             f"[\"{image_ref}\"]")
                return self._fail(final, lines, None, FailureType.PUSH_IMAGE_NOT_FOUND,
                                  f"failed to find one or more images after execution of build steps: "
                                  f"[\"{image_ref}\"]")
            lines.append(f"Pushing {image_ref}")
            try:
                pushed = self.steps.push(record, image_ref, local)
            except PushError as exc:
                lines.append(f"{exc}")
                return self._fail(final, lines, None, FailureType.PUSH_FAILED, f"failed to push {image_ref}: {exc}")
            lines.append(f"latest: digest: {pushed.digest} size: 1234")
            built = final.results.images.add(name=image_ref, digest=pushed.digest)
            now_pb(built.push_timing.start_time)
            now_pb(built.push_timing.end_time)
        lines.append("DONE")
        final.status = Status.SUCCESS
        return final

    def _execute_real(self, record: BuildRecord, substitutions: dict) -> None:
        """_execute on a thread of its own (steps run in the container engine); polls reveal its
        log as it grows and finish the build once this is done."""
        try:
            final = self._execute(record, substitutions)
        except Exception as exc:  # noqa: BLE001 - a crash of the fake fails the build visibly
            final = Build()
            final.CopyFrom(record.build)
            final.status = Status.INTERNAL_ERROR
            final.status_detail = f"lsdeploy fake crashed running the build: {exc!r}"
            record.lines.append(final.status_detail)
        with self.cloud.server.lock:
            record.final = final

    @staticmethod
    def _time_out(final, lines, step_index):
        """What Cloud Build shows when the build's `timeout` passes: the build and the running step
        TIMEOUT, the log's last lines."""
        final.steps[step_index].status = Status.TIMEOUT
        now_pb(final.steps[step_index].timing.end_time)
        for step in final.steps[step_index + 1:]:
            step.status = Status.QUEUED
        lines.append("TIMEOUT")
        lines.append("ERROR: context deadline exceeded")
        final.status = Status.TIMEOUT
        final.status_detail = f"Build timeout ({final.timeout.seconds} s)"
        return final

    def _fail(self, final, lines, step_index, failure_type, detail):
        if step_index is not None:
            final.steps[step_index].status = Status.FAILURE
            now_pb(final.steps[step_index].timing.end_time)
        lines.append("ERROR")
        lines.append(f"ERROR: {detail.split(': ', 1)[1] if detail.startswith('Build step failure') else detail}")
        final.status = Status.FAILURE
        final.status_detail = detail
        final.failure_info.type_ = failure_type
        final.failure_info.detail = detail
        return final

    def _fetch_denied(self, record: BuildRecord, bucket: str) -> str | None:
        """Google's 403 when the build's account may not read the source (storage.objects.get on its
        bucket, granted through the bucket's policy and propagated, or project-wide)."""
        iam = self.cloud.bucket_iam
        if not iam.enforce or iam.allows(bucket, f"serviceAccount:{record.identity}", "storage.objects.get"):
            return None
        return (f"{record.identity} does not have storage.objects.get access to the Google Cloud Storage object. "
                "Permission 'storage.objects.get' denied on resource (or it may not exist).")

    def _identity(self, build, project: str) -> str:
        """The account the build runs as: build.service_account (it must exist, and the caller must be
        allowed to act as it), else the project's default build account: the legacy Cloud Build
        account, or in newer projects (`default_identity = "compute"`) the Compute Engine default one."""
        number = project_number(project)
        if build.service_account:
            m = re.fullmatch(r"projects/([^/]+)/serviceAccounts/([^/]+@[^/]+)", build.service_account)
            if not m:
                raise invalid_argument(f"invalid value for 'build.service_account': {build.service_account}; use "
                                       "projects/PROJECT/serviceAccounts/EMAIL", "build.service_account")
            email = m.group(2)
            iam = self.cloud.iamadmin
            try:
                iam._email(f"projects/{m.group(1)}/serviceAccounts/{email}")
            except ApiError:
                raise invalid_argument(f"invalid value for 'build.service_account': service account {email} does "
                                       "not exist", "build.service_account") from None
            if not iam.holds(email, "iam.serviceAccounts.actAs"):
                raise permission_denied_error("iam.serviceAccounts.actAs",
                                              f"projects/-/serviceAccounts/{email}")
            return email
        if self.default_identity == "compute":
            return f"{number}-compute@developer.gserviceaccount.com"
        return f"{number}@cloudbuild.gserviceaccount.com"

    # ---- progress ----------------------------------------------------------------------------
    def _tick(self, record: BuildRecord) -> None:
        """One poll: QUEUED -> WORKING -> finished over `operation_polls` polls; the log grows."""
        build = record.build
        if build.status not in (Status.QUEUED, Status.WORKING, Status.PENDING):
            return
        record.polls += 1
        phases = max(self.polls_to_finish or self.cloud.server.operation_polls, 1)
        if record.final is None:  # a real build still running: WORKING, its log so far
            build.status = Status.WORKING
            if not build.HasField("start_time"):
                now_pb(build.start_time)
            record.revealed = len(record.lines)
            self._write_log(record)
            return
        if record.polls >= phases:
            started = None
            if build.HasField("start_time"):
                started = type(build.start_time)()
                started.CopyFrom(build.start_time)
            build.CopyFrom(record.final)
            if started is not None:
                build.start_time.CopyFrom(started)
            else:
                now_pb(build.start_time)
            now_pb(build.finish_time)
            record.revealed = len(record.lines)
        else:
            build.status = Status.WORKING
            if not build.HasField("start_time"):
                now_pb(build.start_time)
            record.revealed = max(record.revealed, len(record.lines) * record.polls // phases)
            for index, step in enumerate(record.final.steps):
                if step.status == Status.SUCCESS and f"Finished Step #{index}" in \
                        "\n".join(record.lines[:record.revealed]):
                    build.steps[index].status = Status.SUCCESS
        self._write_log(record)

    def _write_log(self, record: BuildRecord) -> None:
        bucket = record.build.logs_bucket
        if not bucket.startswith("gs://") or bucket.endswith(".cloudbuild-logs.googleusercontent.com"):
            return
        bucket_name, _, prefix = bucket[5:].partition("/")
        name = f"{prefix.rstrip('/') + '/' if prefix else ''}log-{record.build.id}.txt"
        self.cloud.storage.put(bucket_name, name, self.log_text(record.build.id).encode(), content_type="text/plain")

    # ---- read --------------------------------------------------------------------------------
    def GetBuild(self, request, ctx):
        record = self._find(request.name, request.project_id, request.id)
        self._tick(record)
        return record.build

    def ListBuilds(self, request, ctx):
        if request.parent:
            project, location = request.parent.split("/")[1], request.parent.split("/")[3]
        else:
            project, location = request.project_id, "global"
        records = [r for r in self.builds.values()
                   if project_number(r.build.project_id) == project_number(project) and r.location == location]
        for record in records:
            self._tick(record)
        builds = [r.build for r in records]
        for clause in filter(None, re.split(r"\s+AND\s+", request.filter.strip())) if request.filter else []:
            m = re.fullmatch(r'(status|tags|images|id|build_trigger_id)\s*=\s*"?([^"]*)"?', clause.strip())
            if not m:
                raise invalid_argument(f"Invalid filter: {request.filter}", "filter")
            key, value = m.groups()
            if key == "status":
                builds = [b for b in builds if Status.Name(b.status) == value]
            elif key in ("tags", "images"):
                builds = [b for b in builds if value in getattr(b, key)]
            else:
                builds = [b for b in builds if getattr(b, key) == value]
        builds.sort(key=lambda b: b.create_time.ToNanoseconds(), reverse=True)
        page, token = paginate(builds, request.page_size, request.page_token)
        return cb.ListBuildsResponse.pb()(builds=page, next_page_token=token)

    def CancelBuild(self, request, ctx):
        record = self._find(request.name, request.project_id, request.id)
        build = record.build
        if build.status in (Status.QUEUED, Status.WORKING, Status.PENDING):
            build.status = Status.CANCELLED
            now_pb(build.finish_time)
            record.lines.append("CANCELLED")
            record.revealed = len(record.lines)
            self._write_log(record)
        return build
