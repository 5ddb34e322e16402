"""Fuzz the running server against its own OpenAPI document (a bounded number of examples).

No 5xx from the SDK itself, no HTML error page, every response matching the document."""
import json

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from support import Server  # noqa: E402

EXAMPLES = 40  # per operation; CI keeps fuzzing bounded


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from lsdeploy.blueprints import create

    directory = tmp_path_factory.mktemp("fuzz") / "backend"
    create(directory, blueprint="default")
    server = Server(directory, "--workers", "1", "--threads", "4", env={"MAX_REQUEST_BYTES": "1000000"}).start()
    yield server
    server.stop()


def test_document_is_served_and_shipped(fuzz_server):
    from lsdeploy.server import openapi_document

    served = fuzz_server.get("/openapi.json").json()
    assert served == json.loads(openapi_document())
    assert set(served["paths"]) == {"/", "/health", "/setup", "/predict", "/webhook", "/train", "/versions",
                                    "/metrics", "/openapi.json"}


def test_fuzz_every_operation(fuzz_server):
    """Positive and negative examples for every operation, against the real gunicorn server."""
    import requests
    from hypothesis import Phase, given
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    selected = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                checks.response_schema_conformance, checks.negative_data_rejection]
    session = requests.Session()
    counts = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in ("positive", "negative"):
            strategy = operation.as_strategy(generation_mode=getattr(schemathesis.GenerationMode, mode.upper()))

            @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def run(case):
                response = case.call(base_url=fuzz_server.url, session=session, timeout=30)
                assert "text/html" not in response.headers.get("Content-Type", "")
                case.validate_response(response, checks=selected)
                counts[operation.label] = counts.get(operation.label, 0) + 1

            try:
                run()
            except Unsatisfiable:
                if mode == "positive":
                    raise  # an operation without parameters has no negative examples: fine
    missing = {r.ok().label for r in schema.get_all_operations()} - set(counts)
    assert not missing, f"operations never exercised: {missing}"
    total = sum(counts.values())
    print(f"fuzz cases run: {total} over {len(counts)} operations")
    assert "Traceback" not in fuzz_server.log()
