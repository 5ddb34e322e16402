"""The Label Studio client's parts that need no Label Studio: key kinds, project ids, error
wording, secrets kept out of output, and what answers where Label Studio should be (a local stub
server: a login page, a non-JSON answer). Everything that talks to Label Studio is in tests/e2e/."""
from __future__ import annotations

import base64
import json

import pytest
import requests

from labelstudio_server import StubServer
from lsdeploy.errors import EXIT_USAGE, LsdeployError
from lsdeploy.labelstudio import LabelStudio, Registration, key_kind
from lsdeploy.labelstudio.backends import _health_status, _project_uid
from lsdeploy.labelstudio.errors import _project_id, _reason
from support import free_port, run_cli


def jwt(payload: dict) -> str:
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.c2lnbmF0dXJl"


def response(status: int, body) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp._content = (json.dumps(body) if not isinstance(body, str) else body).encode()
    return resp


def test_key_kinds_are_told_apart_without_asking():
    assert key_kind(jwt({"token_type": "refresh", "exp": 9999999999, "user_id": "1"})) == "personal access token"
    assert key_kind(jwt({"token_type": "access", "exp": 9999999999})) == "access token"
    assert key_kind("4f1c0e9a3b2d8e7f6a5b4c3d2e1f0a9b8c7d6e5f") == "legacy token"
    assert key_kind("a.b.c") == "legacy token"  # three parts but no JSON payload: not a JWT


def test_project_ids_accept_label_studio_forms():
    assert _project_id(7) == 7 and _project_id("7") == 7 and _project_id("7.1700000000") == 7
    with pytest.raises(LsdeployError) as err:
        _project_id("seven")
    assert err.value.exit_code == EXIT_USAGE


def test_health_status_is_read_from_label_studios_reason():
    """A /health that answered a status is the backend's answer (not retried, not "cannot reach")."""
    answered = ("Can't connect to ML backend http://b, health check failed. Make sure it is up. Additional info: "
                "500 Server Error: Internal Server Error for url: http://b/health")
    missed = ("Can't connect to ML backend http://b, health check failed. Additional info: "
              "HTTPConnectionPool(host='b', port=80): Read timed out. (read timeout=1)")
    assert _health_status(answered) == 500 and _health_status(missed) is None
    assert _project_uid({"id": 3, "created_at": "2026-11-27T05:00:00.123456Z"}) == "3.1795755600"
    assert _project_uid({"id": 3}) == "3"


def test_reason_quotes_label_studio_without_html_or_envelope():
    body = {"id": "x", "status_code": 400, "version": "1.23.2", "detail": "Validation error", "exc_info": None,
            "validation_errors": {"non_field_errors": [
                "Can't connect to ML backend http://b, health check failed. "
                '<a href="https://labelstud.io/guide/ml.html">Learn more</a> about it.']}}
    text = _reason(response(400, body))
    assert text.startswith("Can't connect to ML backend http://b, health check failed.")
    assert "Learn more about it" in text and "<a" not in text and "1.23.2" not in text
    assert _reason(response(403, {"detail": "URL resolves to a reserved network address"})) == \
        "URL resolves to a reserved network address"
    assert _reason(response(502, "Bad gateway\nfrom the proxy")) == "Bad gateway"
    page = "\n<!doctype html><html><head><title>Server Error (500)</title>"
    assert _reason(response(500, page)) == "Server Error (500)"
    assert _reason(response(502, "<html>\nBad gateway</html>")) == "HTTP 502 (a web page)"


def test_key_never_in_repr():
    secret = jwt({"token_type": "refresh", "exp": 9999999999})
    client = LabelStudio("localhost:8080", secret)
    assert client.host == "http://localhost:8080"
    assert secret not in repr(client) and "personal access token" in repr(client)
    reg = Registration(backend_id=1, project=2, url="http://b", basic_auth=True)
    assert reg.to_dict()["basic_auth"] is True and "basic_auth_pass" not in reg.to_dict()


def test_missing_host_or_key_is_a_usage_error():
    for host, key in (("", "k"), ("http://ls", "")):
        with pytest.raises(LsdeployError) as err:
            LabelStudio(host, key)
        assert err.value.exit_code == EXIT_USAGE and "LABEL_STUDIO_" in str(err.value)


def test_connect_needs_a_project_and_both_basic_auth_parts():
    env = {"LABEL_STUDIO_URL": f"http://127.0.0.1:{free_port()}", "LABEL_STUDIO_API_KEY": "secret-key-123456"}
    done = run_cli("connect", "http://127.0.0.1:9", env=env)
    assert done.returncode == EXIT_USAGE and "--project" in done.stderr
    done = run_cli("connect", "http://127.0.0.1:9", "--project", "1", env={**env, "BASIC_AUTH_USER": "u"})
    assert done.returncode == EXIT_USAGE and "BASIC_AUTH_PASS" in done.stderr
    done = run_cli("disconnect", "--project", "1", env=env)
    assert done.returncode == EXIT_USAGE and "--backend-id" in done.stderr


def test_unreachable_label_studio_is_one_line_without_the_key():
    url = f"http://127.0.0.1:{free_port()}"
    env = {"LABEL_STUDIO_URL": url, "LABEL_STUDIO_API_KEY": "secret-key-123456", "LABEL_STUDIO_PROJECT": "1,2"}
    done = run_cli("connect", "http://127.0.0.1:9", env=env)
    assert done.returncode == EXIT_USAGE
    assert f"cannot reach Label Studio at {url}" in done.stderr and "LABEL_STUDIO_URL" in done.stderr
    assert "Traceback" not in done.stderr and "secret-key-123456" not in done.stdout + done.stderr


def test_a_password_in_the_label_studio_address_is_never_shown():
    port = free_port()
    env = {"LABEL_STUDIO_URL": f"http://proxy-user:proxy-pass-778899@127.0.0.1:{port}",
           "LABEL_STUDIO_API_KEY": "secret-key-123456", "LABEL_STUDIO_PROJECT": "1"}
    done = run_cli("connect", "http://127.0.0.1:9", env=env)
    assert done.returncode == EXIT_USAGE
    assert f"cannot reach Label Studio at http://127.0.0.1:{port}" in done.stderr
    assert "proxy-pass-778899" not in done.stdout + done.stderr
    client = LabelStudio(env["LABEL_STUDIO_URL"], env["LABEL_STUDIO_API_KEY"])
    assert client.host == env["LABEL_STUDIO_URL"]  # requests still authenticate to the proxy
    assert "proxy-pass-778899" not in repr(client)


def test_every_option_reads_an_environment_variable():
    for command in ("connect", "disconnect"):
        done = run_cli(command, "--help")
        assert done.returncode == 0
        for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_PROJECT", "LSDEPLOY_JSON"):
            assert name in done.stdout, (command, name)
    done = run_cli("connect", "--help")
    for name in ("BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LSDEPLOY_TITLE", "LSDEPLOY_INTERACTIVE"):
        assert name in done.stdout
    for name in ("LSDEPLOY_VERIFY", "LABEL_STUDIO_TIMEOUT", "LSDEPLOY_BACKEND_URL"):
        assert name in done.stdout, name
    done = run_cli("disconnect", "--help")
    for name in ("LSDEPLOY_BACKEND_ID", "LABEL_STUDIO_TIMEOUT", "LSDEPLOY_BACKEND_URL"):
        assert name in done.stdout, name


@pytest.fixture
def stub():
    made = []

    def make(**kwargs):
        made.append(StubServer(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


LOGIN_PAGE = b"<!doctype html><html><head><title>Sign in</title></head><body>Sign in with SSO</body></html>"


@pytest.mark.parametrize("status, kind", [(200, "legacy"), (401, "legacy"), (403, "legacy"), (404, "legacy"),
                                          (200, "pat"), (401, "pat"), (403, "pat")])
def test_a_web_page_instead_of_the_api_names_the_address(stub, status, kind):
    """A proxy's or single sign-on login page (or a wrong URL) where Label Studio's API should be:
    one line naming the host and LABEL_STUDIO_URL, not a JSON decoding error or "refused the key"."""
    page = stub(status=status, content_type="text/html; charset=utf-8", body=LOGIN_PAGE)
    key = jwt({"token_type": "refresh", "exp": 9999999999}) if kind == "pat" else "legacy-key-abcdef-123"
    done = run_cli("connect", "http://127.0.0.1:9", "--project", "1",
                   env={"LABEL_STUDIO_URL": page.url, "LABEL_STUDIO_API_KEY": key})
    assert done.returncode == EXIT_USAGE, done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {page.url} answered /api/") and "with an HTML page" in error
    assert "not Label Studio's API" in error and "LABEL_STUDIO_URL" in error
    assert "JSONDecodeError" not in done.stderr and "refused" not in error and key not in done.stderr


def test_an_answer_that_is_not_json_names_the_address(stub):
    plain = stub(content_type="text/plain", body=b"hello")
    with pytest.raises(LsdeployError) as err:
        LabelStudio(plain.url, "legacy-key-abcdef-123").whoami()
    assert err.value.exit_code == EXIT_USAGE
    assert (f"{plain.url} answered /api/current-user/whoami with something that is not JSON (text/plain)"
            in str(err.value))


def test_a_key_with_surrounding_whitespace_is_stripped(stub):
    """A key read from an env file often ends with a line break: it is sent without it."""
    label_studio = stub()
    for key in ("abc123-legacy\n", " abc123-legacy", "abc123-legacy \r\n"):
        assert LabelStudio(label_studio.url, key).whoami()["email"] == "a@example.com"
    assert label_studio.authorizations == ["Token abc123-legacy"] * 3
    with pytest.raises(LsdeployError) as err:
        LabelStudio(label_studio.url, " \n")
    assert err.value.exit_code == EXIT_USAGE and "no Label Studio API key" in str(err.value)


def test_a_key_that_cannot_be_a_header_is_not_an_unreachable_label_studio(stub):
    label_studio = stub()
    with pytest.raises(LsdeployError) as err:
        LabelStudio(label_studio.url, "abc123\nlegacy").whoami()
    message = str(err.value)
    assert err.value.exit_code == EXIT_USAGE and "cannot reach" not in message
    assert "cannot be sent in an HTTP header" in message and "LABEL_STUDIO_API_KEY" in message
    assert "abc123" not in message and label_studio.authorizations == []


class FakeApi:
    """Stands in for the requests.Session of a LabelStudio client: answers each (method, path) from
    `routes` ((status, body), or a function of the JSON body giving one) and records what was sent
    as (method, path, JSON body)."""

    def __init__(self, routes: dict):
        self.routes, self.sent = routes, []

    def request(self, method, url, json=None, params=None, headers=None, timeout=None):
        import urllib.parse

        path = urllib.parse.urlsplit(url).path
        self.sent.append((method, path, json))
        answer = self.routes[(method, path)]
        status, body = answer(json) if callable(answer) else answer
        resp = response(status, body)
        resp.headers["Content-Type"] = "application/json"
        resp.url = url
        return resp

    def bodies(self, method, path) -> list:
        return [body for m, p, body in self.sent if (m, p) == (method, path)]


BACKEND = {"id": 5, "url": "http://b", "project": 7, "title": "mine", "is_interactive": True, "state": "CO",
           "auth_method": "BASIC_AUTH", "basic_auth_user": "u", "model_version": "0.0.1",
           "description": "set in the UI"}
HOOK = {"id": 9, "url": "http://b/webhook", "project": 7, "headers": {"Authorization": "Basic dTpw"},
        "is_active": True}


def fake_label_studio(backends, project_version="0.0.1", routes=None):
    return FakeApi({("GET", "/api/projects/7"): (200, {"id": 7, "model_version": project_version}),
                    ("GET", "/api/ml/"): (200, backends), ("PATCH", "/api/ml/5"): (200, BACKEND),
                    ("POST", "/api/ml/"): (201, {**BACKEND, "is_interactive": False, "auth_method": "NONE"}),
                    ("GET", "/api/webhooks/"): (200, [HOOK]), ("PATCH", "/api/webhooks/9/"): (200, HOOK),
                    **(routes or {})})


def test_connect_again_changes_only_what_was_passed():
    """Settings the user made in Label Studio (interactive, title, description, basic auth and the
    webhook's header) stay when connect runs again without them; passed ones change."""
    api = fake_label_studio([BACKEND])
    (reg,) = LabelStudio("http://ls", "legacy-key", session=api).register("http://b", [7], verify=False)
    # Label Studio checks a PATCH of a basic-auth backend with the credentials in it: "" is its stored password.
    assert api.bodies("PATCH", "/api/ml/5") == [{"url": "http://b", "project": 7, "auth_method": "BASIC_AUTH",
                                                 "basic_auth_user": "u", "basic_auth_pass": ""}]
    assert api.bodies("PATCH", "/api/webhooks/9/") == []
    assert (reg.is_interactive, reg.title, reg.basic_auth, reg.created) == (True, "mine", True, False)

    api = fake_label_studio([BACKEND])
    LabelStudio("http://ls", "legacy-key", session=api).register(
        "http://b", [7], verify=False, interactive=False, title="renamed", basic_auth=("u", "p2"))
    (body,) = api.bodies("PATCH", "/api/ml/5")
    assert body == {"url": "http://b", "project": 7, "title": "renamed", "is_interactive": False,
                    "auth_method": "BASIC_AUTH", "basic_auth_user": "u", "basic_auth_pass": "p2"}
    (hook,) = api.bodies("PATCH", "/api/webhooks/9/")
    assert hook["headers"] == {"Authorization": "Basic " + base64.b64encode(b"u:p2").decode()}


def test_a_new_backend_gets_the_defaults():
    api = fake_label_studio([])
    (reg,) = LabelStudio("http://ls", "legacy-key", session=api).register("http://b", [7], verify=False)
    (body,) = api.bodies("POST", "/api/ml/")
    assert body == {"url": "http://b", "project": 7, "title": "lsdeploy http://b", "is_interactive": False,
                    "auth_method": "NONE", "basic_auth_user": None}
    assert reg.created and not reg.is_interactive


def test_the_project_is_pointed_at_the_backends_model_version():
    """Label Studio sets a new backend's title as the project's model_version; the Data Manager's
    score column shows only predictions of that version, so connect points it at the backend's."""
    api = fake_label_studio([BACKEND], project_version="mine",
                            routes={("PATCH", "/api/projects/7"): (200, {"id": 7, "model_version": "0.0.1"})})
    (reg,) = LabelStudio("http://ls", "legacy-key", session=api).register("http://b", [7], verify=False)
    assert api.bodies("PATCH", "/api/projects/7") == [{"model_version": "0.0.1"}]
    assert reg.project_model_version == "0.0.1"
    assert "Settings > Annotation" in reg.note and "when the model retrains" in reg.note

    # Label Studio takes a version only once it has a prediction of it: one task's is fetched first.
    refused = (400, {"detail": "Validation error", "validation_errors": {"model_version": [
        "Model version doesn't exist either as live model or as static predictions."]}})
    answers = [refused, (200, {"id": 7, "model_version": "0.0.1"})]
    api = fake_label_studio([BACKEND], project_version="mine", routes={
        ("PATCH", "/api/projects/7"): lambda body: answers.pop(0),
        ("GET", "/api/tasks/"): (200, {"tasks": [{"id": 31}]}), ("POST", "/api/dm/actions"): (200, {})})
    (reg,) = LabelStudio("http://ls", "legacy-key", session=api).register("http://b", [7], verify=False)
    assert api.bodies("POST", "/api/dm/actions") == [{"selectedItems": {"all": False, "included": [31]}}]
    assert reg.project_model_version == "0.0.1" and not answers

    # No task to predict: the project is left as it is and the note says what to do.
    api = fake_label_studio([BACKEND], project_version="mine", routes={
        ("PATCH", "/api/projects/7"): refused, ("GET", "/api/tasks/"): (200, {"tasks": []})})
    (reg,) = LabelStudio("http://ls", "legacy-key", session=api).register("http://b", [7], verify=False)
    assert reg.project_model_version == "mine"
    assert "Prediction score column stays empty" in reg.note and "pick 0.0.1 in Settings > Annotation" in reg.note


def test_a_project_using_another_backend_or_no_version_change_is_left_alone():
    other = {**BACKEND, "id": 6, "url": "http://other", "title": "other model"}
    api = fake_label_studio([BACKEND, other], project_version="other model")
    (reg,) = LabelStudio("http://ls", "legacy-key", session=api).register("http://b", [7], verify=False)
    assert api.bodies("PATCH", "/api/projects/7") == []
    assert reg.project_model_version == "other model" and "another backend" in reg.note

    api = fake_label_studio([BACKEND])
    (reg,) = LabelStudio("http://ls", "legacy-key", session=api).register("http://b", [7], verify=False,
                                                                         use_version=False)
    assert api.bodies("PATCH", "/api/projects/7") == [] and reg.project_model_version == "" and not reg.note


def test_a_project_on_another_version_moves_only_with_scores():
    """A project on a version that need not be this model's (predictions the team imported, say
    `human-v1`) is left as it is unless --scores says otherwise; the note says how."""
    moved = {("PATCH", "/api/projects/7"): (200, {"id": 7, "model_version": "0.0.1"})}
    api = fake_label_studio([BACKEND], project_version="human-v1", routes=dict(moved))
    (reg,) = LabelStudio("http://ls", "legacy-key", session=api).register("http://b", [7], verify=False)
    assert api.bodies("PATCH", "/api/projects/7") == [] and reg.project_model_version == "human-v1"
    assert "model version 'human-v1'" in reg.note and "pass --scores" in reg.note

    api = fake_label_studio([BACKEND], project_version="human-v1", routes=dict(moved))
    (reg,) = LabelStudio("http://ls", "legacy-key", session=api).register("http://b", [7], verify=False,
                                                                         use_version=True)
    assert api.bodies("PATCH", "/api/projects/7") == [{"model_version": "0.0.1"}]
    assert reg.project_model_version == "0.0.1"



def test_a_redirect_to_another_host_never_gets_the_token_or_a_password():
    """A 307/308 re-sends the body: the personal access token being refreshed, a backend's basic-auth
    password. Only the same host (or http to https on it) is followed; elsewhere it is an error."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"access": "x"}')

        def log_message(self, *args):
            pass

    elsewhere = ThreadingHTTPServer(("127.0.0.2", 0), Elsewhere)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    target = f"http://127.0.0.2:{elsewhere.server_port}/api/token/refresh/"

    class Redirecting(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(307)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    origin = ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    try:
        pat = jwt({"token_type": "refresh", "exp": 4102444800, "jti": "abc"})
        client = LabelStudio(f"http://127.0.0.1:{origin.server_port}", pat, timeout=10)
        with pytest.raises(LsdeployError):
            client.authorization()
        assert received == []
    finally:
        for server in (origin, elsewhere):
            server.shutdown()
            server.server_close()
