"""Property-based requests from the service's own OpenAPI: whatever the body, never a 500.

Schemathesis generates requests for every operation, valid ones and ones that break the
schema, against the hostile suite's real service; a few examples per operation and mode keep
it inside CI's time. Every error answer must be the API's error shape. (Schemathesis' own
pytest plugin does not run under this pytest, so its strategies are driven by Hypothesis here.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.hostile.harness import ATTACKER, Service

AUTH = {"Authorization": f"Bearer {ATTACKER}"}


def test_no_request_makes_a_500(hostile: Service):
    schema = schemathesis.openapi.from_url(f"{hostile.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 15
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(mode))
            @settings(
                max_examples=6,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def no_500(case) -> None:
                response = case.call(headers=AUTH, timeout=120)
                assert response.status_code != 500, (case.method, case.path, response.text)
                kind = (response.headers.get("content-type") or [""])[0]
                if response.status_code >= 400 and kind.startswith("application/json"):
                    assert "error" in response.json(), response.text

            try:
                no_500()
            except Unsatisfiable:
                # Nothing of this operation can be made invalid (no parameters, no body).
                assert mode == GenerationMode.NEGATIVE, operation.label
