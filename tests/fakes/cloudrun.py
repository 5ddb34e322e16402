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

import re
import threading
import uuid
from dataclasses import dataclass, field

from google.cloud import run_v2
from google.iam.v1 import policy_pb2

from .cloudrun_revisions import RevisionState, new_revision, revision_outcome
from .cloudrun_rules import LATEST, REVISION, fill_defaults, validate_service
from .runner import RevisionProcess, ServiceProxy
from .iam import has_role, read_policy, write_policy
from .server import (ApiError, already_exists, carry_over, etag_of, failed_precondition, invalid_argument, not_found,
                     now_pb, paginate, permission_denied_error, project_number, routes_from_transport)

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
            outcome = revision_outcome(self, self.revisions[revision_name])
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
        state.generation_revision[1] = new_revision(self, state, project)
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
        carry_over(current, updated, OUTPUT_ONLY)  # the server's fields; the new generation updates some below
        updated.generation = current.generation + 1
        updated.last_modifier = "lsdeploy-tests@example.com"
        now_pb(updated.update_time)
        updated.reconciling = True
        state.message.CopyFrom(updated)
        if template_changed:
            revision = new_revision(self, state, project)
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
            revision_outcome(self, rstate)
        messages = sorted((r.message for r in revisions), key=lambda m: m.create_time.ToNanoseconds(), reverse=True)
        page, token = paginate(messages, request.page_size, request.page_token)
        return run_v2.ListRevisionsResponse.pb()(revisions=page, next_page_token=token)

    def GetRevision(self, request, ctx):
        rstate = self.revisions.get(request.name)
        if rstate is None:
            raise not_found(f"Resource '{request.name.rsplit('/', 1)[-1]}' of kind 'REVISION' does not exist.")
        revision_outcome(self, rstate)
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

