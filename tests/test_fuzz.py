"""Fuzz the running server against its own OpenAPI document (a bounded number of examples).

No 5xx from the SDK itself, no HTML error page, every response matching the document; every
operation of the shipped document exercised. Two servers: the default blueprint without auth,
and the text-classifier blueprint (which parses the label config and trains) behind basic auth,
fuzzed with and without credentials so the documented 401s are checked too."""
import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from support import Server  # noqa: E402

EXAMPLES = 40  # per operation and generation mode; CI keeps fuzzing bounded
AUTH = ("fuzz-user", "fuzz-pa55")


def shipped_operations() -> set:
    """'METHOD /path' of every operation in the document the package ships."""
    from lsdeploy.server import openapi_document

    paths = json.loads(openapi_document())["paths"]
    return {f"{method.upper()} {path}" for path, operations in paths.items() for method in operations}


def start(tmp_path_factory, blueprint, env=None):
    from lsdeploy.blueprints import create

    directory = tmp_path_factory.mktemp(f"fuzz-{blueprint}") / "backend"
    create(directory, blueprint=blueprint)
    env = {"MAX_REQUEST_BYTES": "1000000", **(env or {})}
    return Server(directory, "--workers", "1", "--threads", "4", env=env).start()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    server = start(tmp_path_factory, "default")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server = start(tmp_path_factory, "text-classifier", env={"BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1]})
    yield server
    server.stop()


def fuzz(server, examples: int, modes=("positive", "negative"), auth=None, expect=None) -> dict:
    """Run `examples` generated cases per operation and mode against `server`; returns how many
    ran per operation. `expect(operation, response)` may assert more about each answer."""
    import requests
    from hypothesis import Phase, given
    from hypothesis.errors import Unsatisfiable
    from lsdeploy.server import openapi_document

    # From the shipped document, not from_url: that one leaves out the operation serving it.
    schema = schemathesis.openapi.from_dict(json.loads(openapi_document()))
    selected = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                checks.response_schema_conformance, checks.negative_data_rejection]
    session = requests.Session()
    session.auth = auth
    counts = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=getattr(schemathesis.GenerationMode, mode.upper()))

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case):
                response = case.call(base_url=server.url, session=session, timeout=30)
                assert "text/html" not in response.headers.get("Content-Type", "")
                case.validate_response(response, checks=selected)
                if expect is not None:
                    expect(operation, response)
                counts[operation.label] = counts.get(operation.label, 0) + 1

            try:
                run()
            except Unsatisfiable:
                if mode == "positive":
                    raise  # an operation without parameters has no negative examples: fine
    missing = shipped_operations() - set(counts)
    assert not missing, f"operations never exercised: {missing}"
    return counts


def test_document_is_served_and_shipped(fuzz_server):
    from lsdeploy.server import openapi_document

    served = fuzz_server.get("/openapi.json").json()
    assert served == json.loads(openapi_document())
    assert set(served["paths"]) == {"/", "/health", "/setup", "/predict", "/webhook", "/train", "/versions",
                                    "/metrics", "/openapi.json", "/jobs/{job}", "/jobs/{job}/retry"}
    assert len(shipped_operations()) == 11


def test_fuzz_every_operation(fuzz_server):
    """Positive and negative examples for every operation, against the real gunicorn server."""
    counts = fuzz(fuzz_server, EXAMPLES)
    print(f"fuzz cases run (default blueprint): {sum(counts.values())} over {len(counts)} operations")
    assert "Traceback" not in fuzz_server.log()


def test_fuzz_text_classifier_behind_basic_auth(auth_server):
    """The text-classifier blueprint with credentials (its setup parses every label config the
    fuzzer makes up; its fit trains on made-up annotations), then without: every operation
    but GET /health answers the documented 401, and /health shows no store details."""
    authorized = fuzz(auth_server, EXAMPLES // 2, auth=AUTH)

    def refused(operation, response):
        if operation.label == "GET /health":
            assert response.status_code == 200 and "uri" not in response.json()["store"]
        else:
            assert response.status_code == 401, (operation.label, response.status_code)

    anonymous = fuzz(auth_server, 5, modes=("positive",), expect=refused)
    total = sum(authorized.values()) + sum(anonymous.values())
    print(f"fuzz cases run (text-classifier, basic auth): {total} over {len(authorized)} operations"
          f" ({sum(anonymous.values())} without credentials)")
    assert auth_server.get("/health", auth=AUTH).status_code == 200
    log = auth_server.log()
    assert "Traceback" not in log and "fit failed" not in log  # fits that outlived FIT_WAIT_SECONDS too
