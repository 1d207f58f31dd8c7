"""``GET /openapi.json`` describes the server as it is, and no request generated from it (or from its negation) gets
a 5xx: schemathesis fuzzes a live server on 127.0.0.1 (the scripted tiny gpt-oss of test_server, every model id,
``max_tokens_cap=4`` so that every generation is short).
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_server import BASE_ID, build_scripted, raw, start

from inference.engine import Engine
from inference.serve.server import make_server

EXAMPLES = 30   # per operation and generation mode: a few seconds in all on the tiny model
# Valid requests: no 5xx, and each answer as the schema says (status, content type, body). Requests outside the
# schema: no 5xx (their answers are errors, each one documented, but the statuses are not pinned per case).
CHECKS = {GenerationMode.POSITIVE: [not_a_server_error, status_code_conformance, content_type_conformance,
                                    response_schema_conformance],
          GenerationMode.NEGATIVE: [not_a_server_error, status_code_conformance, content_type_conformance]}


@pytest.fixture(scope="module", autouse=True)
def _hypothesis_home(tmp_path_factory):
    """Hypothesis keeps caches (constants, unicode data) under ./.hypothesis even without an example database;
    tests write nothing into the checkout."""
    set_hypothesis_home_dir(str(tmp_path_factory.mktemp("hypothesis")))
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    model_dir, adapters = build_scripted(tmp_path_factory)
    # A 512-token window: generated prompts past it are refused before any compute (400) instead of taking a
    # second each to prefill on CPU, and both paths are still exercised.
    engine = Engine.load(str(model_dir), adapters=adapters, name=BASE_ID, context_length=512)
    server = make_server(engine, max_tokens_cap=4)
    port = start(server)
    yield f"http://127.0.0.1:{port}"
    server.shutdown()
    server.server_close()


def test_the_schema_names_every_route_and_the_models(url):
    status, _, body = raw(int(url.rsplit(":", 1)[1]), "GET", "/openapi.json", key=None)
    doc = json.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.")
    assert sorted(doc["paths"]) == ["/health", "/openapi.json", "/v1/chat/completions", "/v1/models",
                                    "/v1/models/{model}"]
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    body_schema = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["properties"]["model"]["enum"] == [BASE_ID, "thinker", "caller"]
    assert {"400", "401", "404", "405", "413", "429", "503"} <= set(chat["responses"])
    assert "Retry-After" in chat["responses"]["429"]["headers"] and "security" not in doc   # no key, no scheme


@pytest.fixture(scope="module")
def api_schema(url):
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


# Hypothesis driven directly: schemathesis' own pytest decorator (schema.parametrize) fails on pytest 9 (it sets a
# node attribute pytest no longer has).
# Only the chat body can be negated: the other operations take no input, or a path string that any string fits.
@pytest.mark.parametrize("method, path, mode", [
    ("GET", "/health", GenerationMode.POSITIVE),
    ("GET", "/v1/models", GenerationMode.POSITIVE),
    ("GET", "/v1/models/{model}", GenerationMode.POSITIVE),
    ("GET", "/openapi.json", GenerationMode.POSITIVE),
    ("POST", "/v1/chat/completions", GenerationMode.POSITIVE),
    ("POST", "/v1/chat/completions", GenerationMode.NEGATIVE),
], ids=lambda v: v.value if isinstance(v, GenerationMode) else v)
def test_no_request_is_a_server_error(api_schema, url, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(base_url=url, checks=CHECKS[mode])

    check()
