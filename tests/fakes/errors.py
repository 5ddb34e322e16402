"""Google-style API errors of the fakes: `{"error": {"code", "message", "status", "details"}}` with
the HTTP status of the gRPC code, and the exact shapes of the common ones (IAM permission denied,
an API not enabled, a quota)."""
from __future__ import annotations

from google.rpc import status_pb2

# --------------------------------------------------------------------------------------------
# Errors

HTTP_STATUS = {
    "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
    "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}
GRPC_CODE = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
HELP = "type.googleapis.com/google.rpc.Help"
LOCALIZED_MESSAGE = "type.googleapis.com/google.rpc.LocalizedMessage"

SERVICE_TITLES = {
    "run": ("run.googleapis.com", "Cloud Run Admin API"),
    "cloudbuild": ("cloudbuild.googleapis.com", "Cloud Build API"),
    "artifactregistry": ("artifactregistry.googleapis.com", "Artifact Registry API"),
    "secretmanager": ("secretmanager.googleapis.com", "Secret Manager API"),
    "serviceusage": ("serviceusage.googleapis.com", "Service Usage API"),
    "cloudresourcemanager": ("cloudresourcemanager.googleapis.com", "Cloud Resource Manager API"),
    "iam": ("iam.googleapis.com", "Identity and Access Management (IAM) API"),
    "logging": ("logging.googleapis.com", "Cloud Logging API"),
}


class ApiError(Exception):
    """A Google API error: answered as `{"error": {"code", "message", "status", "details"}}`."""

    def __init__(self, status: str, message: str, details: list[dict] | None = None, http: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = list(details or [])
        self.http = http or HTTP_STATUS[status]

    def body(self) -> dict:
        error = {"code": self.http, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}

    def rpc_status(self) -> status_pb2.Status:
        """The same error as a google.rpc.Status (what a failed operation carries)."""
        status = status_pb2.Status(code=GRPC_CODE[self.status], message=self.message)
        for detail in self.details:
            if detail.get("@type") == ERROR_INFO:
                from google.rpc import error_details_pb2

                info = error_details_pb2.ErrorInfo(reason=detail.get("reason", ""), domain=detail.get("domain", ""))
                info.metadata.update(detail.get("metadata", {}))
                status.details.add().Pack(info)
        return status


def invalid_argument(message: str, field_path: str | None = None) -> ApiError:
    details = []
    if field_path is not None:
        details.append({"@type": BAD_REQUEST, "fieldViolations": [{"field": field_path, "description": message}]})
    return ApiError("INVALID_ARGUMENT", message, details)


def not_found(message: str) -> ApiError:
    return ApiError("NOT_FOUND", message)


def already_exists(message: str) -> ApiError:
    return ApiError("ALREADY_EXISTS", message)


def failed_precondition(message: str) -> ApiError:
    return ApiError("FAILED_PRECONDITION", message)


def permission_denied_error(permission: str, resource: str) -> ApiError:
    """What IAM answers when the caller lacks `permission` on `resource`."""
    return ApiError(
        "PERMISSION_DENIED",
        f"Permission '{permission}' denied on resource '{resource}' (or it may not exist).",
        [{"@type": ERROR_INFO, "reason": "IAM_PERMISSION_DENIED", "domain": "iam.googleapis.com",
          "metadata": {"permission": permission, "resource": resource}}],
    )


def service_disabled_error(api: str, project_number: str) -> ApiError:
    """What every Google API answers when it is not enabled in the caller's project."""
    service, title = SERVICE_TITLES[api]
    url = f"https://console.developers.google.com/apis/api/{service}/overview?project={project_number}"
    message = (f"{title} has not been used in project {project_number} before or it is disabled. "
               f"Enable it by visiting {url} then retry. If you enabled this API recently, wait a few "
               f"minutes for the action to propagate to our systems and retry.")
    return ApiError("PERMISSION_DENIED", message, [
        {"@type": ERROR_INFO, "reason": "SERVICE_DISABLED", "domain": "googleapis.com",
         "metadata": {"service": service, "serviceTitle": title, "consumer": f"projects/{project_number}",
                      "containerInfo": project_number, "activationUrl": url}},
        {"@type": LOCALIZED_MESSAGE, "locale": "en-US", "message": message},
        {"@type": HELP, "links": [{"description": "Google developers console API activation", "url": url}]},
    ])


def quota_error(api: str, project_number: str, metric: str = "Write requests",
                limit: str = "Write requests per minute per region") -> ApiError:
    service, _ = SERVICE_TITLES[api]
    metric_id = f"{service}/{metric.lower().replace(' ', '_')}"
    return ApiError("RESOURCE_EXHAUSTED",
                    f"Quota exceeded for quota metric '{metric}' and limit '{limit}' of service '{service}' "
                    f"for consumer 'project_number:{project_number}'.",
                    [{"@type": ERROR_INFO, "reason": "RATE_LIMIT_EXCEEDED", "domain": "googleapis.com",
                      "metadata": {"service": service, "consumer": f"projects/{project_number}",
                                   "quota_metric": metric_id, "quota_limit": limit.replace(" ", "")}}])
