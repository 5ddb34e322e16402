"""Cloud Run Admin API v2 fake: services (create, get, update with update_mask / allow_missing,
delete, list), revisions (list, get, delete), IAM policies and operations.

What it does like the real API:
- validates what the proto cannot and fills in the server-side defaults a GetService shows
  (cloudrun_rules.py), and ignores output-only fields sent by the client;
- bumps `generation` only when the spec changes and creates a revision `S-0000N-xyz` only when
  the template changes; an unchanged update creates nothing;
- a revision that does not become ready takes no traffic: the service's Ready condition fails
  with Cloud Run's message, `latest_ready_revision` and the traffic stay where they were;
- the create/update/delete operation is not done in its first answer.

With the runner on, each new revision is started as a local process from the bundle its image
was built from (see runner.py) and the service's `uri` is a stable local proxy URL that follows
the traffic; with the runner off, revisions become ready after `ready_delay` seconds unless a
`never_ready()` fault says otherwise.
"""
from __future__ import annotations

import random
import re
import threading
import string
import time
import uuid
from dataclasses import dataclass, field

from google.cloud import run_v2
from google.iam.v1 import policy_pb2

from .artifactregistry import parse_image
from .cloudrun_rules import LATEST, REVISION, fill_defaults, validate_service
from .runner import RevisionProcess, ServiceProxy
from .iam import has_role, read_policy, write_policy
from .server import (ApiError, already_exists, etag_of, failed_precondition, invalid_argument, not_found, now_pb,
                     paginate, permission_denied_error, project_number, routes_from_transport)

Service = run_v2.Service.pb()
Revision = run_v2.Revision.pb()
Condition = run_v2.Condition.pb()
TrafficTarget = run_v2.TrafficTarget.pb()
TrafficTargetStatus = run_v2.TrafficTargetStatus.pb()
SUCCEEDED = Condition.State.CONDITION_SUCCEEDED
FAILED = Condition.State.CONDITION_FAILED
PENDING = Condition.State.CONDITION_PENDING
RECONCILING = Condition.State.CONDITION_RECONCILING

OUTPUT_ONLY = ("uid", "generation", "create_time", "update_time", "delete_time", "expire_time", "creator",
               "last_modifier", "observed_generation", "terminal_condition", "conditions", "latest_ready_revision",
               "latest_created_revision", "traffic_statuses", "uri", "urls", "satisfies_pzs", "reconciling", "etag")
def error_page(code: int, title: str, text: str) -> str:
    """The HTML Google's front end answers with."""
    return (f'<html><head>\n<meta http-equiv="content-type" content="text/html;charset=utf-8">\n'
            f"<title>{code} {title}</title>\n</head>\n<body text=#000000 bgcolor=#ffffff>\n"
            f"<h1>Error: {title}</h1>\n<h2>{text}</h2>\n<h2></h2>\n</body></html>\n")


def secret_exists(secrets, name: str) -> bool:
    return secrets.canonical(name) in secrets.secrets


@dataclass
class RevisionState:
    message: object  # Revision
    created: float
    process: RevisionProcess | None = None
    outcome: str | None = None  # None (pending) | "ready" | failure message
    failure: str | None = None  # known at creation (image, secrets, fault); reported after ready_delay


@dataclass
class ServiceState:
    message: object  # Service
    policy: object = field(default_factory=policy_pb2.Policy)
    revision_count: int = 0
    outcomes: dict = field(default_factory=dict)  # generation -> None | "ready" | failure message
    generation_revision: dict = field(default_factory=dict)  # generation -> revision name (or None)
    failure_status: dict = field(default_factory=dict)  # generation -> status of its operation's error
    proxy: ServiceProxy | None = None
    serving: dict = field(default_factory=dict)  # revision name -> percent of traffic


class CloudRunFake:
    api = "run"

    def __init__(self, cloud, runner: bool = False, ready_delay: float = 0.2, startup_deadline: float = 120.0,
                 require_secret_access: bool = True, enforce_invoker: bool = True):
        self.cloud = cloud
        # Like Cloud Run: a secret reference needs roles/secretmanager.secretAccessor for the revision's
        # service account, and (runner on) a request needs an allUsers invoker binding or
        # invoker_iam_disabled, since Label Studio sends no Google identity token.
        self.require_secret_access = require_secret_access
        self.enforce_invoker = enforce_invoker
        self.runner = runner
        self.ready_delay = ready_delay
        self.startup_deadline = startup_deadline
        self.services: dict[str, ServiceState] = {}
        self.revisions: dict[str, RevisionState] = {}
        self.never_ready_faults: dict[str, list] = {}  # service id -> [message, times]
        self.extra_env: dict[str, str] = {}  # env every revision process gets (e.g. STORAGE_EMULATOR_HOST)
        server = cloud.server
        server.add_routes(routes_from_transport(
            self.api, "google.cloud.run_v2.services.services.transports.rest", "ServicesRestTransport"))
        server.add_routes(routes_from_transport(
            self.api, "google.cloud.run_v2.services.revisions.transports.rest", "RevisionsRestTransport"))
        for method in ("CreateService", "GetService", "UpdateService", "DeleteService", "ListServices",
                       "GetIamPolicy", "SetIamPolicy", "TestIamPermissions", "ListRevisions", "GetRevision",
                       "DeleteRevision"):
            server.handle(self.api, method)(getattr(self, method))

    # ---- faults and inspection -----------------------------------------------------------------
    def never_ready(self, service_id: str, message: str = "The user-provided container failed to start and listen "
                    "on the port defined provided by the PORT=8080 environment variable within the allocated "
                    "timeout. This can happen when the container port is misconfigured or if the timeout is too "
                    "short. The health check timeout can be extended. Logs for this revision might contain more "
                    "information.", times: int | None = None) -> None:
        """The next revisions of `service_id` (all, or `times` of them) never become ready."""
        self.never_ready_faults[service_id] = [message, times]

    def service(self, service_id: str):
        for name, state in self.services.items():
            if name.rsplit("/", 1)[-1] == service_id:
                self._reconcile(state)
                return state.message
        raise KeyError(service_id)

    def process(self, revision_id: str) -> RevisionProcess | None:
        for name, state in self.revisions.items():
            if name.rsplit("/", 1)[-1] == revision_id:
                return state.process
        return None

    def close(self) -> None:
        """Stop every revision process and proxy (the fixture calls it)."""
        for state in self.revisions.values():
            if state.process is not None:
                state.process.stop(grace=10)
                state.process.cleanup()
        for state in self.services.values():
            if state.proxy is not None:
                state.proxy.stop()
                state.proxy = None

    # ---- validation ------------------------------------------------------------------------------
    def _validate(self, service, request_name: str, service_id: str, new: bool = True, region: str = "") -> None:
        validate_service(service, request_name, service_id, new, region)

    def _check_act_as(self, service, project: str) -> None:
        """Deploying a revision that runs as an account needs iam.serviceAccounts.actAs on it (Cloud Run
        names it in lower case)."""
        account = service.template.service_account or f"{project_number(project)}-compute@developer.gserviceaccount.com"
        if not self.cloud.iamadmin.holds(account, "iam.serviceAccounts.actAs"):
            raise permission_denied_error("iam.serviceaccounts.actAs", f"projects/-/serviceAccounts/{account}")

    def _defaults(self, service, project: str) -> None:
        fill_defaults(service, project)

    def _new_revision(self, state: ServiceState, project: str) -> str:
        service = state.message
        service_id = service.name.rsplit("/", 1)[-1]
        state.revision_count += 1
        template = service.template
        revision_id = template.revision or (
            f"{service_id}-{state.revision_count:05d}-"
            f"{''.join(random.choices(string.ascii_lowercase + string.digits, k=3))}")
        name = f"{service.name}/revisions/{revision_id}"
        if name in self.revisions:
            raise already_exists(f"Revision named '{revision_id}' already exists.")
        revision = Revision(name=name, uid=str(uuid.uuid4()), generation=1, service=service.name,
                            observed_generation=1, launch_stage=service.launch_stage, reconciling=True,
                            creator=service.last_modifier)
        for f in template.DESCRIPTOR.fields:
            if f.name in Revision.DESCRIPTOR.fields_by_name and f.name != "revision":
                target = Revision.DESCRIPTOR.fields_by_name[f.name]
                if target.type != f.type or target.message_type != f.message_type:
                    continue
                if f.is_repeated and f.message_type is not None and f.message_type.GetOptions().map_entry:
                    getattr(revision, f.name).update(getattr(template, f.name))
                elif f.is_repeated:
                    getattr(revision, f.name).extend(getattr(template, f.name))
                elif f.message_type is not None:
                    if template.HasField(f.name):
                        getattr(revision, f.name).CopyFrom(getattr(template, f.name))
                else:
                    setattr(revision, f.name, getattr(template, f.name))
        now_pb(revision.create_time)
        now_pb(revision.update_time)
        revision.log_uri = (f"https://console.cloud.google.com/logs/viewer?project={project}&resource="
                            f"cloud_run_revision/service_name/{service_id}/revision_name/{revision_id}")
        revision.conditions.add(type_="Ready", state=RECONCILING)
        revision.etag = etag_of(revision)
        rstate = RevisionState(revision, time.monotonic())
        self.revisions[name] = rstate

        failure = self._prepare(rstate, service_id, project)
        if failure:
            rstate.failure = failure
        elif self.runner and rstate.process is not None:
            rstate.process.start()
        return name

    def _prepare(self, rstate: RevisionState, service_id: str, project: str) -> str | None:
        """Resolve the image and secrets; set up the process. Returns a failure message or None."""
        revision = rstate.message
        fault = self.never_ready_faults.get(service_id)
        if fault is not None and fault[1] != 0:
            if fault[1] is not None:
                fault[1] -= 1
            return fault[0]
        container = revision.containers[0]
        ar_fake = self.cloud.artifactregistry
        image = ar_fake.resolve(container.image)
        parts = parse_image(container.image)
        if image is None and parts is not None:
            repository = f"projects/{parts['project']}/locations/{parts['location']}/repositories/{parts['repo']}"
            if repository in ar_fake.repositories:
                return f"Image '{container.image}' not found."
        env = {}
        for index, var in enumerate(container.env):
            if var.HasField("value_source"):
                ref = var.value_source.secret_key_ref
                secret = ref.secret if ref.secret.startswith("projects/") else \
                    f"projects/{project}/secrets/{ref.secret}"
                version = ref.version or "latest"
                canonical = f"{self.cloud.secretmanager.canonical(secret)}/versions/{version}"
                runtime = f"serviceAccount:{revision.service_account}"
                if (self.require_secret_access and secret_exists(self.cloud.secretmanager, secret)
                        and not self.cloud.secretmanager.can_access(secret, runtime)):
                    return (f"spec.template.spec.containers[0].env[{index}].value_from.secret_key_ref.name: "
                            f"Permission denied on secret: {canonical} for Revision service account "
                            f"{revision.service_account}. The service account used must be granted the 'Secret "
                            f"Manager Secret Accessor' role (roles/secretmanager.secretAccessor) at the secret, "
                            f"project or higher level.")
                try:
                    env[var.name] = self.cloud.secretmanager.value(secret, version).decode()
                except ApiError:
                    return (f"spec.template.spec.containers[0].env[{index}].value_from.secret_key_ref.name: Secret "
                            f"{self.cloud.secretmanager.canonical(secret)}/versions/{ref.version or 'latest'} was "
                            f"not found")
            else:
                env[var.name] = var.value
        if not self.runner:
            return None
        if image is None:
            return (f"Image '{container.image}' was not built by the Cloud Build fake, so the lsdeploy fake cannot "
                    f"run it.")
        revision_id = revision.name.rsplit("/", 1)[-1]
        env.update({"K_SERVICE": service_id, "K_REVISION": revision_id, "K_CONFIGURATION": service_id})
        probe = container.startup_probe
        path = (probe.http_get.path or "/") if probe.HasField("http_get") else None
        # Cloud Run gives up after initial delay + period x failure threshold (240 s by default).
        deadline = (probe.initial_delay_seconds + (probe.period_seconds or 10) * (probe.failure_threshold or 3)
                    if container.HasField("startup_probe") else 240)
        rstate.process = RevisionProcess(
            revision_id, image.bundle,
            {"command": list(container.command), "args": list(container.args), "working_dir": container.working_dir,
             "dockerfile": image.dockerfile},
            env, {"path": path, "deadline": min(deadline + 5, self.startup_deadline)}, self.cloud.workdir,
            extra_env=self.extra_env)
        return None

    def _revision_outcome(self, rstate: RevisionState) -> str | None:
        if rstate.outcome is None:
            if rstate.failure is not None:
                if time.monotonic() - rstate.created >= self.ready_delay:
                    rstate.outcome = rstate.failure
            elif rstate.process is not None:
                if rstate.process.state == "ready":
                    rstate.outcome = "ready"
                elif rstate.process.state == "failed":
                    rstate.outcome = rstate.process.message
            elif time.monotonic() - rstate.created >= self.ready_delay:
                rstate.outcome = "ready"
            if rstate.outcome is not None:
                revision = rstate.message
                del revision.conditions[:]
                revision.reconciling = False
                ready = rstate.outcome == "ready"
                condition = revision.conditions.add(type_="Ready", state=SUCCEEDED if ready else FAILED)
                now_pb(condition.last_transition_time)
                if not ready:
                    condition.message = rstate.outcome
                    condition.reason = 5  # CONTAINER_MISSING/failed: the generic revision failure reason
                for kind in ("ContainerHealthy", "ResourcesAvailable"):
                    c = revision.conditions.add(type_=kind, state=SUCCEEDED if ready else FAILED)
                    now_pb(c.last_transition_time)
                revision.etag = etag_of(revision)
        return rstate.outcome

    # ---- reconciliation --------------------------------------------------------------------------
    def _reconcile(self, state: ServiceState) -> None:
        service = state.message
        generation = service.generation
        if state.outcomes.get(generation) is not None:
            return
        revision_name = state.generation_revision.get(generation)
        if revision_name is None:
            outcome = "ready"
        else:
            outcome = self._revision_outcome(self.revisions[revision_name])
            if outcome is None:
                return
        routes_error = None
        if outcome == "ready":
            if revision_name is not None:
                service.latest_ready_revision = revision_name
            routes_error = self._missing_traffic_revision(service)
        state.outcomes[generation] = outcome if routes_error is None else routes_error
        del service.conditions[:]
        service.reconciling = False
        service.observed_generation = generation
        terminal = service.terminal_condition
        terminal.Clear()
        terminal.type_ = "Ready"
        now_pb(terminal.last_transition_time)
        if outcome == "ready" and routes_error is None:
            terminal.state = SUCCEEDED
            for kind in ("RoutesReady", "ConfigurationsReady"):
                c = service.conditions.add(type_=kind, state=SUCCEEDED)
                now_pb(c.last_transition_time)
        elif routes_error is not None:  # the revisions are fine, the traffic names a missing one
            state.failure_status[generation] = "INTERNAL"
            terminal.state = FAILED
            terminal.message = routes_error
            c = service.conditions.add(type_="RoutesReady", state=FAILED, message=routes_error)
            now_pb(c.last_transition_time)
            c = service.conditions.add(type_="ConfigurationsReady", state=SUCCEEDED)
            now_pb(c.last_transition_time)
        else:
            state.failure_status[generation] = "FAILED_PRECONDITION"
            revision = self.revisions[revision_name].message
            revision_id = revision_name.rsplit("/", 1)[-1]
            terminal.state = FAILED
            terminal.message = f"Revision '{revision_id}' is not ready and cannot serve traffic. {outcome}"
            if "container" in outcome:
                terminal.message += (f"\n\nLogs URL: {revision.log_uri}\nFor more troubleshooting guidance, see "
                                     f"https://cloud.google.com/run/docs/troubleshooting#container-failed-to-start")
            c = service.conditions.add(type_="ConfigurationsReady", state=FAILED, message=terminal.message)
            now_pb(c.last_transition_time)
            c = service.conditions.add(type_="RoutesReady", state=SUCCEEDED)
            now_pb(c.last_transition_time)
        self._route(state)
        service.etag = etag_of(service)

    def _route(self, state: ServiceState) -> None:
        """Traffic statuses from the traffic targets; the proxy follows; idle revisions stop."""
        service = state.message
        del service.traffic_statuses[:]
        serving: dict[str, int] = {}
        for target in service.traffic:
            revision = service.latest_ready_revision if target.type_ == LATEST else \
                f"{service.name}/revisions/{target.revision}"
            status = service.traffic_statuses.add(type_=target.type_, percent=target.percent, tag=target.tag)
            if target.type_ != LATEST:
                status.revision = target.revision
            if target.tag:
                status.uri = service.uri
            if revision and revision in self.revisions:
                serving[revision] = serving.get(revision, 0) + target.percent
        state.serving = serving
        for name, rstate in self.revisions.items():
            if (rstate.message.service == service.name and name not in serving and rstate.process is not None
                    and rstate.outcome is not None and rstate.process.state == "ready"):
                # no traffic: scaled to zero (off the server's lock; SIGTERM then SIGKILL after 10 s)
                threading.Thread(target=rstate.process.stop, daemon=True).start()

    def _access(self, state: ServiceState, method: str, path: str, headers):
        """Cloud Run's front end: ingress, then the invoker check (None = let the request through)."""
        with self.cloud.server.lock:
            service = state.message
            internal = service.ingress in (run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_ONLY,
                                           run_v2.IngressTraffic.INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER)
            public = service.invoker_iam_disabled or has_role(state.policy, "allUsers", ("roles/run.invoker",))
        if internal:
            return 404, error_page(404, "Not Found", f"The requested URL <code>{path}</code> was not found on "
                                                     f"this server.")
        if public or not self.enforce_invoker:
            return None
        if (headers.get("Authorization") or "").startswith("Bearer "):
            return None  # an identity token: the fake cannot verify it and trusts it
        return 403, error_page(403, "Forbidden", f"Your client does not have permission to get URL "
                                                 f"<code>{path}</code> from this server.")

    def _targets(self, state: ServiceState):
        """What the service's proxy routes to: [(RevisionProcess, percent)]."""
        with self.cloud.server.lock:
            self._reconcile(state)
            return [(self.revisions[name].process, percent) for name, percent in state.serving.items()
                    if name in self.revisions and self.revisions[name].process is not None
                    and self.revisions[name].outcome == "ready"]

    def _operation(self, state: ServiceState, kind: str = "update"):
        service = state.message
        generation = service.generation
        location = service.name.split("/services/")[0]
        name = f"{location}/operations/{self.cloud.server.operation_id()}"

        def snapshot():
            self._reconcile(state)
            copy = Service()
            copy.CopyFrom(state.message)
            return copy

        def check():
            self._reconcile(state)
            outcome = state.outcomes.get(generation, "ready" if state.message.generation > generation else None)
            if outcome is None:
                return None
            if outcome != "ready":
                return ApiError(state.failure_status.get(generation, "FAILED_PRECONDITION"),
                                state.message.terminal_condition.message)
            return snapshot()

        return self.cloud.server.new_operation(name, self.api, snapshot, check).to_pb()

    # ---- services ------------------------------------------------------------------------------
    def _state(self, name: str) -> ServiceState:
        m = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)/services/([^/]+)", name)
        state = self.services.get(name)
        if state is None:
            project, region, service_id = m.groups() if m else ("?", "?", name)
            raise not_found(f"Resource '{service_id}' of kind 'SERVICE' in region '{region}' in project "
                            f"'{project}' does not exist.")
        self._reconcile(state)
        return state

    def _create(self, parent: str, service_id: str, incoming, validate_only: bool, request_name: str):
        self._validate(incoming, request_name, service_id, region=parent.split("/")[3] if parent.count("/") >= 3 else "")
        self._check_act_as(incoming, parent.split("/")[1])
        name = f"{parent}/services/{service_id}"
        if name in self.services:
            raise already_exists(f"Resource '{service_id}' already exists.")
        project, region = parent.split("/")[1], parent.split("/")[3]
        service = Service()
        service.CopyFrom(incoming)
        for f in OUTPUT_ONLY:
            service.ClearField(f)
        service.name = name
        self._defaults(service, project)
        if validate_only:
            return self._done(service)
        service.uid = str(uuid.uuid4())
        service.generation = 1
        service.creator = service.last_modifier = "lsdeploy-tests@example.com"
        now_pb(service.create_time)
        now_pb(service.update_time)
        service.reconciling = True
        state = ServiceState(service)
        self.services[name] = state
        if self.runner:
            state.proxy = ServiceProxy(lambda: self._targets(state), lambda *a: self._access(state, *a))
            service.uri = state.proxy.url
        else:
            service.uri = f"https://{service_id}-{project_number(project)}.{region}.run.app"
        service.urls.append(service.uri)
        state.generation_revision[1] = self._new_revision(state, project)
        service.latest_created_revision = state.generation_revision[1]
        service.terminal_condition.type_ = "Ready"
        service.terminal_condition.state = RECONCILING
        service.etag = etag_of(service)
        return self._operation(state, "create")

    def _done(self, service):
        name = f"{service.name.split('/services/')[0]}/operations/{self.cloud.server.operation_id()}"
        operation = self.cloud.server.new_operation(name, self.api, lambda: service, lambda: service, polls_needed=0)
        operation.advance()
        return operation.to_pb()

    def _missing_traffic_revision(self, service) -> str | None:
        """Cloud Run accepts traffic naming a missing revision, then fails the operation (code 13)."""
        for target in service.traffic:
            if target.type_ == REVISION and f"{service.name}/revisions/{target.revision}" not in self.revisions:
                return (f"Revision '{target.revision}' does not exist or is deleted. Update all traffic to route to "
                        f"currently available revisions.")
        return None

    def CreateService(self, request, ctx):
        return self._create(request.parent, request.service_id, request.service, request.validate_only,
                            "CreateServiceRequest")

    def UpdateService(self, request, ctx):
        name = request.service.name
        m = re.fullmatch(r"(projects/[^/]+/locations/[^/]+)/services/([^/]+)", name)
        if name not in self.services:
            if request.allow_missing:
                return self._create(m.group(1), m.group(2), request.service, request.validate_only,
                                    "UpdateServiceRequest")
            self._state(name)
        state = self._state(name)
        current = state.message
        if request.service.etag and request.service.etag != current.etag:
            raise ApiError("ABORTED", f"Resource '{m.group(2)}' has been modified: the etag in the request does not "
                                      f"match the current one. Get the service again and retry.")
        updated = Service()
        if request.update_mask.paths:
            updated.CopyFrom(current)
            try:
                request.update_mask.MergeMessage(request.service, updated, replace_message_field=True,
                                                 replace_repeated_field=True)
            except ValueError as exc:
                raise invalid_argument(f"Invalid update_mask: {exc}", "update_mask") from None
        else:
            updated.CopyFrom(request.service)
        for f in OUTPUT_ONLY:
            updated.ClearField(f)
        updated.name = name
        self._validate(updated, "UpdateServiceRequest", m.group(2), new=False, region=m.group(1).split("/")[3])
        self._check_act_as(updated, m.group(1).split("/")[1])
        project = m.group(1).split("/")[1]
        self._defaults(updated, project)
        if request.validate_only:
            return self._done(updated)

        def spec(message):
            copy = Service()
            copy.CopyFrom(message)
            for f in OUTPUT_ONLY:
                copy.ClearField(f)
            return copy

        if spec(updated) == spec(current):  # nothing changed: no new generation, no new revision
            return self._operation(state)
        template_changed = updated.template != current.template
        if template_changed and updated.template.revision and \
                f"{name}/revisions/{updated.template.revision}" in self.revisions:
            raise already_exists(f"Revision named '{updated.template.revision}' already exists.")
        for f in OUTPUT_ONLY:  # the server's fields carry over; the new generation updates some below
            descriptor = current.DESCRIPTOR.fields_by_name[f]
            if descriptor.is_repeated:
                getattr(updated, f).extend(getattr(current, f))
            elif descriptor.message_type is not None:
                if current.HasField(f):
                    getattr(updated, f).CopyFrom(getattr(current, f))
            else:
                setattr(updated, f, getattr(current, f))
        updated.generation = current.generation + 1
        updated.last_modifier = "lsdeploy-tests@example.com"
        now_pb(updated.update_time)
        updated.reconciling = True
        state.message.CopyFrom(updated)
        if template_changed:
            revision = self._new_revision(state, project)
            state.generation_revision[updated.generation] = revision
            state.message.latest_created_revision = revision
        state.message.terminal_condition.state = RECONCILING
        state.message.terminal_condition.ClearField("message")
        state.message.etag = etag_of(state.message)
        return self._operation(state)

    def GetService(self, request, ctx):
        return self._state(request.name).message

    def ListServices(self, request, ctx):
        states = [s for n, s in sorted(self.services.items()) if n.startswith(request.parent + "/services/")]
        for state in states:
            self._reconcile(state)
        page, token = paginate([s.message for s in states], request.page_size, request.page_token)
        return run_v2.ListServicesResponse.pb()(services=page, next_page_token=token)

    def DeleteService(self, request, ctx):
        state = self._state(request.name)
        if request.etag and request.etag != state.message.etag:
            raise ApiError("ABORTED", "The etag in the request does not match the current one.")
        service = Service()
        service.CopyFrom(state.message)
        if request.validate_only:
            return self._done(service)
        now_pb(service.delete_time)
        del self.services[request.name]
        for name in [n for n, r in self.revisions.items() if r.message.service == request.name]:
            rstate = self.revisions.pop(name)
            if rstate.process is not None:
                rstate.process.stop()
                rstate.process.cleanup()
        if state.proxy is not None:
            state.proxy.stop()
        location = request.name.split("/services/")[0]
        name = f"{location}/operations/{self.cloud.server.operation_id()}"
        return self.cloud.server.new_operation(name, self.api, lambda: service, lambda: service).to_pb()

    # ---- IAM -----------------------------------------------------------------------------------
    def GetIamPolicy(self, request, ctx):
        return read_policy(self._state(request.resource).policy)

    def SetIamPolicy(self, request, ctx):
        state = self._state(request.resource)
        state.policy = write_policy(state.policy, request)
        return state.policy

    def TestIamPermissions(self, request, ctx):
        self._state(request.resource)
        from google.iam.v1 import iam_policy_pb2

        return iam_policy_pb2.TestIamPermissionsResponse(permissions=list(request.permissions))

    # ---- revisions ---------------------------------------------------------------------------
    def ListRevisions(self, request, ctx):
        if request.parent not in self.services:
            self._state(request.parent)
        self._reconcile(self.services[request.parent])
        revisions = [r for n, r in self.revisions.items() if r.message.service == request.parent]
        for rstate in revisions:
            self._revision_outcome(rstate)
        messages = sorted((r.message for r in revisions), key=lambda m: m.create_time.ToNanoseconds(), reverse=True)
        page, token = paginate(messages, request.page_size, request.page_token)
        return run_v2.ListRevisionsResponse.pb()(revisions=page, next_page_token=token)

    def GetRevision(self, request, ctx):
        rstate = self.revisions.get(request.name)
        if rstate is None:
            raise not_found(f"Resource '{request.name.rsplit('/', 1)[-1]}' of kind 'REVISION' does not exist.")
        self._revision_outcome(rstate)
        return rstate.message

    def DeleteRevision(self, request, ctx):
        rstate = self.revisions.get(request.name)
        if rstate is None:
            raise not_found(f"Resource '{request.name.rsplit('/', 1)[-1]}' of kind 'REVISION' does not exist.")
        state = self.services.get(rstate.message.service)
        if state is not None:
            self._reconcile(state)
            serving = {s.revision for s in state.message.traffic_statuses if s.revision} | (
                {state.message.latest_ready_revision.rsplit("/", 1)[-1]}
                if any(s.type_ == LATEST for s in state.message.traffic_statuses) else set())
            if request.name.rsplit("/", 1)[-1] in serving:
                raise failed_precondition(f"Revision '{request.name.rsplit('/', 1)[-1]}' is serving traffic and "
                                          f"cannot be deleted.")
        revision = Revision()
        revision.CopyFrom(rstate.message)
        if request.validate_only:
            return self._done_revision(revision)
        del self.revisions[request.name]
        if rstate.process is not None:
            rstate.process.stop()
            rstate.process.cleanup()
        return self._done_revision(revision, done=False)

    def _done_revision(self, revision, done: bool = True):
        name = f"{revision.name.split('/services/')[0]}/operations/{self.cloud.server.operation_id()}"
        operation = self.cloud.server.new_operation(name, self.api, lambda: revision, lambda: revision,
                                                    polls_needed=0 if done else None)
        if done:
            operation.advance()
        return operation.to_pb()

