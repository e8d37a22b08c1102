"""Schemathesis fuzzes the live aggregator from its own OpenAPI document: no request it can make gets a 5xx, or an
answer the document does not describe.

Every operation is fuzzed with the credential it needs (a device token, an upload token of the open round, or the
operator's token), so generated bodies reach the handlers instead of stopping at 401; then the state machine
follows the document's links from check-in to the round's operations. Both a plain and a secure aggregator are
fuzzed, so each round route meets the phase that handles it.
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from schemathesis.generation.stateful import run_state_machine_as_test

from aggregator.api.client import AggregatorClient

# Bounded: this runs in every CI run.
EXAMPLES_PER_OPERATION = 30
STATEFUL_STEPS = 40
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance, checks.negative_data_rejection]
FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck),
                     phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])


class Credentials:
    """The bearer token each operation needs, from a device this test enrolled and got selected."""

    def __init__(self, url: str, operator_token: str) -> None:
        client = AggregatorClient(url)
        self.device = client.enrol().device_token
        decision = client.checkin(self.device)
        assert decision.action == "train"
        self.round, self.upload, self.operator = decision.round, decision.upload_token, operator_token

    def headers(self, case: schemathesis.Case) -> dict[str, str]:
        path = case.operation.path
        token = (self.operator if path == "/clock" else self.upload if path.startswith("/rounds/")
                 else self.device)
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture(params=["plain", "secure"])
def fuzzed(request, start_aggregator, small_tokenizer_path, small_model_config):
    aggregator = start_aggregator(small_tokenizer_path, small_model_config, simulated_clock=True,
                                  clients_per_round=3, secure_aggregation=request.param == "secure")
    schema = schemathesis.openapi.from_url(f"{aggregator.url}/openapi.json")
    return aggregator, schema, Credentials(aggregator.url, aggregator.config.operator_token)


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(fuzzed):
    aggregator, schema, credentials = fuzzed
    cases: dict[str, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13  # every route is in the document, the upload's body too

    for operation in operations:

        @settings(max_examples=EXAMPLES_PER_OPERATION, **FUZZ_SETTINGS)
        @given(case=operation.as_strategy())
        def fuzz(case: schemathesis.Case) -> None:
            cases[operation.label] = cases.get(operation.label, 0) + 1  # noqa: B023 (run in this iteration only)
            headers = credentials.headers(case)
            response = case.call(base_url=aggregator.url, headers=headers, timeout=10)
            case.validate_response(response, checks=CHECKS, headers=headers)

        fuzz()
    print(f"schemathesis ran {sum(cases.values())} cases over {len(cases)} operations")
    assert len(cases) == len(operations)


@pytest.mark.slow
def test_following_the_documents_links_gets_no_server_error(fuzzed):
    aggregator, schema, credentials = fuzzed
    machine = schema.as_state_machine()

    class Links(machine):
        def get_call_kwargs(self, case: schemathesis.Case) -> dict:
            return {"base_url": aggregator.url, "headers": credentials.headers(case), "timeout": 10}

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            case.validate_response(response, checks=CHECKS, headers=credentials.headers(case))

    run_state_machine_as_test(Links, settings=settings(max_examples=5, stateful_step_count=STATEFUL_STEPS,
                                                      **FUZZ_SETTINGS))
