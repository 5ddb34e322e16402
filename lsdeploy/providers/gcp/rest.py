"""A Google API called over REST with an authorized session, for the few calls whose official
Python client speaks gRPC only (IAM's service accounts, Cloud Logging's entries.list). Errors are
google.api_core exceptions, like the other clients'."""
from __future__ import annotations


class RestClient:
    default_endpoint = ""

    def __init__(self, session, endpoint: str = ""):
        self.session = session
        self.endpoint = (endpoint or self.default_endpoint).rstrip("/")

    @classmethod
    def from_options(cls, options: dict):
        """From GcpClients' options: credentials, and an endpoint override when one is set."""
        from google.auth.transport.requests import AuthorizedSession

        client_options = options.get("client_options")
        return cls(AuthorizedSession(options["credentials"]), getattr(client_options, "api_endpoint", None) or "")

    def request(self, method: str, path: str, body=None, timeout: float = 60) -> dict:
        from google.api_core import exceptions as gexc

        response = self.session.request(method, f"{self.endpoint}/{path}", json=body, timeout=timeout)
        if response.status_code >= 400:
            raise gexc.from_http_response(response)
        return response.json() if response.content else {}
