"""The provider interface: what every deploy target implements.

A provider is built with its API clients already made (tests pass clients pointed at local
fakes; the CLI builds real ones from the environment) and a settings object of its own.
Each method returns a result dataclass; the CLI renders `to_dict()` as JSON or `lines()` as text.
Progress goes through the `progress(str)` callback (the CLI prints it on stderr).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


@dataclass
class PlanResult:
    """What a deploy would do, without changing anything (`deploy --dry-run`)."""

    service: str
    project: str = ""
    region: str = ""
    action: str = "create"                # "create", "update" or "none" (the service as it is)
    service_exists: bool = False
    bundle_digest: str = ""
    bundle_size: int = 0
    bundle_files: list = field(default_factory=list)   # [{"path", "size", "source"}]
    dockerfile: str = ""                  # "own" or "blueprint:<name>"
    dockerfile_text: str = ""             # the Dockerfile the build would use
    ignore_file: str = ""
    image: str = ""                       # pinned by digest when it exists, else the tag a build would push
    build_needed: bool = True
    changes: list = field(default_factory=list)   # [{"field", "live", "desired"}], live None for a new service
    prune: list = field(default_factory=list)     # what the deploy would delete afterwards (old images, bundles, logs)
    label_studio_projects: list = field(default_factory=list)  # projects it would register with

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list:
        what = {"create": "would be created", "update": "would be updated",
                "none": "unchanged (the deploy would send no update)"}[self.action]
        out = [f"service {self.service} in {self.project}/{self.region}: {what}",
               f"Dockerfile ({self.dockerfile}):"]
        out += [f"  | {line}" for line in self.dockerfile_text.rstrip("\n").splitlines()]
        out.append(f"bundle {self.bundle_digest[:12]}: {len(self.bundle_files)} files, {self.bundle_size} bytes "
                   f"(sha256 {self.bundle_digest})" + (f", {self.ignore_file} applied" if self.ignore_file else ""))
        shown = self.bundle_files if len(self.bundle_files) <= 50 else self.bundle_files[:40]
        out += [f"  {f['path']}  {f['size']} bytes" + ("" if f["source"] == "directory" else f" ({f['source']})")
                for f in shown]
        if len(shown) < len(self.bundle_files):
            out.append(f"  ... and {len(self.bundle_files) - len(shown)} more files (--json lists every file)")
        out.append("build: " + (f"needed, would push {self.image}" if self.build_needed
                                else f"not needed, {self.image} exists"))
        if self.changes:
            out.append("changes (live -> desired):" if self.service_exists else "service settings:")
            for change in self.changes:
                if self.service_exists:
                    out.append(f"  {change['field']}: {_show(change['live'])} -> {_show(change['desired'])}")
                else:
                    out.append(f"  {change['field']}: {_show(change['desired'])}")
        elif self.service_exists:
            out.append("changes: none")
        for name in self.prune:
            out.append(f"would prune {name}")
        if self.label_studio_projects:
            out.append(f"would register with Label Studio project(s) {', '.join(map(str, self.label_studio_projects))}")
        out.append("dry run: nothing was changed")
        return out


def _show(value) -> str:
    if value is None or value == "":
        return "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items())) or "(none)"
    return str(value)


@dataclass
class DeployResult:
    provider: str
    project: str
    region: str
    service: str
    url: str
    revision: str
    image: str                      # pinned by digest
    bundle_digest: str
    built: bool                     # False: an image for this bundle already existed
    build_id: Optional[str] = None
    new_revision: bool = False
    state_uri: str = ""
    basic_auth_user: Optional[str] = None
    secrets: list = field(default_factory=list)        # secret resource names (never values)
    registrations: list = field(default_factory=list)  # lsdeploy.labelstudio.Registration.to_dict()
    pruned: list = field(default_factory=list)         # old images, source bundles and build logs deleted
    prune_error: str = ""                              # why pruning stopped (the deploy itself succeeded)
    seconds: float = 0.0
    build_region: Optional[str] = None                 # where Cloud Build ran (when it built)
    build_region_note: str = ""                        # why it ran elsewhere than the service's region
    training_job: str = ""                             # --training job: the job's name, and what the deploy did to it
    training_job_action: str = ""                      # "created", "updated", "unchanged" or "deleted"

    @property
    def backend_ids(self) -> list:
        return [r["backend_id"] for r in self.registrations]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["label_studio_backend_ids"] = self.backend_ids
        return data

    def lines(self) -> list:
        out = [f"URL:       {self.url}",
               f"revision:  {self.revision}" + ("" if self.new_revision else " (unchanged)"),
               f"image:     {self.image}" + ("" if self.built else " (reused, no build)")
               + (f" (built in {self.build_region}: {self.build_region_note})" if self.build_region_note else ""),
               f"state:     {self.state_uri}"]
        if self.basic_auth_user:
            out.append(f"basic auth user: {self.basic_auth_user} (password in Secret Manager)")
        for reg in self.registrations:
            out.append(f"Label Studio backend {reg['backend_id']} in project {reg['project']}: "
                       f"{reg.get('state_name') or reg.get('state')}")
            if reg.get("note"):  # what to do in Label Studio (the Data Manager's scores), as connect says it
                out.append(f"  note: {reg['note']}")
        if not self.registrations:
            out.append("Label Studio: not registered (pass --project to register)")
        if self.training_job:
            out.append(f"training job: {self.training_job} ({self.training_job_action})")
        if self.pruned:
            out.append(f"pruned {len(self.pruned)} old image(s), source bundle(s) and build log(s)")
        if self.prune_error:
            out.append(f"warning: {self.prune_error}")
        return out


@dataclass
class StatusResult:
    service: str
    exists: bool
    url: str = ""
    ready: bool = False
    message: str = ""
    latest_ready_revision: str = ""
    latest_created_revision: str = ""
    traffic: list = field(default_factory=list)      # [{"revision", "percent", "tag", "image"}]
    image: str = ""                                  # the image serving all traffic ("" when split or none)
    image_digest: str = ""
    updated: str = ""
    labels: dict = field(default_factory=dict)
    revisions: list = field(default_factory=list)    # [{"revision", "ready", "message", "image", "created"}], newest first
    label_studio: list = field(default_factory=list)  # [{"project", "backend_id", "state", "state_name"}]
    training_job: str = ""                           # --training job: the job's name
    executions: list = field(default_factory=list)   # its newest executions: [{"execution", "state", "log_uri", ...}]
    executions_error: str = ""                       # why they could not be listed ("" when they were)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list:
        if not self.exists:
            return [f"service {self.service}: not deployed"]
        out = [f"service {self.service}: {'ready' if self.ready else 'NOT ready'}" +
               (f" ({self.message})" if self.message else ""), f"URL: {self.url}"]
        shares, images = {}, {}  # revision -> percent of the traffic, image
        for target in self.traffic:
            if target["percent"] and target["revision"]:
                shares[target["revision"]] = shares.get(target["revision"], 0) + target["percent"]
                images[target["revision"]] = target.get("image") or "(unknown)"
        out += [f"image: {images[revision]} (revision {revision}" + (f", {share}%)" if len(shares) > 1 else ")")
                for revision, share in shares.items()] or ["image: none (no revision serves traffic)"]
        out += [f"last deploy: {self.updated}",
                f"revisions: latest ready {self.latest_ready_revision}, latest created {self.latest_created_revision}"]
        out += [f"  traffic {t['percent']}% -> {t['revision'] or '(no ready revision)'}" for t in self.traffic]
        for rev in self.revisions:
            state = "ready" if rev["ready"] else "not ready" + (f" ({rev['message']})" if rev["message"] else "")
            share = shares.get(rev["revision"])
            out.append(f"  revision {rev['revision']}: {state}" + (f", serving {share}%" if share else ""))
        if self.training_job:
            out.append(f"training job: {self.training_job}" + (
                f" (executions not listed: {self.executions_error})" if self.executions_error else
                "" if self.executions else " (no execution yet)"))
        for run in self.executions:
            counts = ", ".join(f"{run[k]} {k}" for k in ("running", "succeeded", "failed", "retried") if run.get(k))
            out.append(f"  execution {run['execution']}: {run['state']}" + (f" ({counts})" if counts else "") +
                       (f", started {run['started']}" if run.get("started") else "") +
                       (f", logs {run['log_uri']}" if run.get("log_uri") else ""))
            if run.get("reason"):
                out.append(f"    why: {run['reason']}")
        for reg in self.label_studio:
            out.append(f"Label Studio project {reg['project']}: " + (
                f"backend {reg['backend_id']} {reg['state_name']}" if reg.get("backend_id") else reg["state_name"]) +
                (f" ({reg['error_message']})" if reg.get("error_message") else ""))
        return out


@dataclass
class RollbackResult:
    service: str
    from_revisions: list = field(default_factory=list)   # what served before
    to_revision: str = ""
    traffic: list = field(default_factory=list)           # as Cloud Run reports it afterwards
    url: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list:
        return [f"service {self.service}: traffic moved from {', '.join(self.from_revisions) or 'none'} "
                f"to {self.to_revision}"] + [f"  traffic {t['percent']}% -> {t['revision']}" for t in self.traffic]


@dataclass
class DestroyResult:
    service: str
    deleted: list = field(default_factory=list)   # resource names removed
    kept: list = field(default_factory=list)      # related resources left in place, with why
    unregistered: list = field(default_factory=list)  # lsdeploy.labelstudio.Removal.to_dict()
    purge: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list:
        out = [f"deleted {name}" for name in self.deleted] + [f"kept {name}" for name in self.kept]
        for removal in self.unregistered:
            out.append(f"Label Studio project {removal['project']}: removed backend(s) "
                       f"{', '.join(map(str, removal['backend_ids'])) or 'none'}")
        return out or [f"service {self.service}: nothing to delete"]


class Provider(ABC):
    """One deploy target. Subclasses take their API clients in __init__."""

    name = "base"

    @abstractmethod
    def plan(self, settings, bundle) -> PlanResult:
        """What deploy would change; sends no mutating request."""

    @abstractmethod
    def deploy(self, settings, bundle, progress: Progress = _quiet) -> DeployResult:
        """Build (when needed), deploy, register; idempotent for an unchanged bundle and settings."""

    @abstractmethod
    def status(self, settings) -> StatusResult:
        """What is running now."""

    def rollback(self, settings, to_revision=None, progress: Progress = _quiet) -> RollbackResult:
        """Send all traffic to the previous ready revision (or `to_revision`)."""
        raise NotImplementedError(f"rollback is not available for {self.name}")

    def destroy_plan(self, settings, purge: bool = False) -> DestroyResult:
        """What destroy would delete (nothing is changed)."""
        raise NotImplementedError(f"destroy is not available for {self.name}")

    @abstractmethod
    def destroy(self, settings, purge: bool = False, progress: Progress = _quiet) -> DestroyResult:
        """Remove the service (and with purge its images, sources and state)."""
