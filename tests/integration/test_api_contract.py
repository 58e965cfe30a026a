"""The API's OpenAPI contract, held against the live portal by schemathesis.

Property-based and seeded (Hypothesis derandomized), bounded in examples per operation so the run
stays near a minute: every operation of /api/v1/schema, with valid and invalid requests, must
answer no 5xx and nothing the schema does not describe. Random bytes sent as application/dicom
are the uploads no one would send on purpose, which ingest must refuse with a 4xx.
"""

import re
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from pydicom.data import get_testdata_file
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from tests.integration.stack import free_port, wait_for

pytestmark = pytest.mark.integration

UPLOAD_PATH = "/api/v1/instances"
LEASE_PATH = "/api/v1/deliveries"
# A long poll holds each request for up to a minute: the contract of `wait` is the same for
# every value, so the run asks for at most one second of it.
MAX_WAIT_TRIED = 1
OPERATIONS = 7
# Per operation and mode (valid requests, invalid ones): about a minute in all on a loaded machine.
EXAMPLES = 25


@schemathesis.serializer("application/dicom")
def dicom_body(ctx, value) -> dict:
    # Generated bodies are bytes (format: binary), or whatever an invalid request carries.
    return {"data": value if isinstance(value, bytes) else str(value).encode()}


def short_wait(case):
    """The case, with a `wait` the portal would read as more than MAX_WAIT_TRIED seconds cut down."""
    wait = (case.query or {}).get("wait")
    try:
        long = int(wait) > MAX_WAIT_TRIED
    except (TypeError, ValueError):
        long = False
    if long:
        case.query["wait"] = MAX_WAIT_TRIED
    return case


@pytest.fixture(scope="module")
def contract_portal(postgres_stack):
    """A second uvicorn on the same installation, with its static files collected (the docs
    page's assets) and no rate limit, so a fast run meets the portal's answers, not its 429s."""
    postgres_stack.manage("collectstatic", "--no-input", "-v0")
    port = free_port()
    postgres_stack.start_server(port=port, env={**postgres_stack.env, "API_RATE_LIMIT": ""}, name="contract")
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def contract_keys(postgres_stack, pg_network, contract_portal):
    """A publisher's key and a subscriber's, with a delivery of a real file waiting for the latter,
    so the download and acknowledgement operations have an id that exists to find."""
    network = pg_network
    path = get_testdata_file("CT_small.dcm", download=False)
    with open(path, "rb") as handle:
        answer = httpx.post(
            f"{contract_portal}{UPLOAD_PATH}",
            content=handle.read(),
            headers={"Authorization": f"Bearer {network.keys['own']}", "Content-Type": "application/dicom"},
            timeout=30,
        )
    assert answer.status_code in (200, 201), answer.text
    wait_for(
        lambda: postgres_stack.sql(
            "SELECT count(*) FROM routing_delivery d JOIN centers_center c ON c.id = d.center_id WHERE c.slug = %s",
            f"partner-{network.s}",
        )[0][0],
        what="the upload's delivery to the subscriber",
    )
    return {"publisher": network.keys["own"], "subscriber": network.keys["partner"]}


@pytest.fixture(scope="module")
def api_schema(contract_portal):
    schema = schemathesis.openapi.from_url(f"{contract_portal}/api/v1/schema?format=json")
    schema.config.generation.update(
        # REST framework refuses NUL in every string (PostgreSQL cannot store it), a rule JSON
        # Schema has no word for.
        allow_x00=False,
        # The portal ignores query parameters it does not know, as HTTP APIs do.
        allow_extra_parameters=False,
        # Every request carries a real key (a request without one is a 401, tested elsewhere):
        # generated keys would be refused before any of the operation ran.
        with_security_parameters=False,
    )
    return schema


def test_the_live_portal_keeps_its_contract(api_schema, contract_keys, contract_portal):
    """Every operation, with requests that fit the schema and requests that break it."""
    failures = []
    answers: Counter[tuple[str, int | str]] = Counter()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == OPERATIONS
    for operation in operations:
        role = "publisher" if operation.path == UPLOAD_PATH else "subscriber"
        headers = {"Authorization": f"Bearer {contract_keys[role]}"}
        lenient = {
            # The lease reads its query leniently by design: a blank `limit` or `wait` is the
            # default, more than the maximum is the maximum.
            LEASE_PATH: [negative_data_rejection],
            # A DICOM file is a format JSON Schema cannot describe: random bytes are refused with
            # a 400, as they must be. Never a 5xx and the {"error": ...} body are still checked.
            UPLOAD_PATH: [positive_data_acceptance],
        }.get(operation.path, [])
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode).map(short_wait))
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def keeps_the_contract(case):
                response = case.call_and_validate(
                    base_url=contract_portal, headers=headers, excluded_checks=lenient, timeout=30
                )
                answers[(operation.label, response.status_code)] += 1

            try:
                keeps_the_contract()
            except Unsatisfiable:
                # Every request fits some schemas: any bytes are an upload, the agents' listing
                # takes nothing but the key.
                assert mode == GenerationMode.NEGATIVE
                answers[(operation.label, "no invalid request")] += 1
            except (AssertionError, BaseExceptionGroup) as exc:  # schemathesis' failures, each with a curl to replay it
                failures.append(f"{operation.label} ({mode}):\n{exc}")
    print("\n".join(f"{label} -> {status}: {count}" for (label, status), count in sorted(answers.items(), key=str)))
    assert not failures, "\n\n".join(failures)
    assert not [status for (_, status) in answers if isinstance(status, int) and status >= 500]


def test_the_docs_page_loads_its_assets_from_the_portal(contract_portal):
    page = httpx.get(f"{contract_portal}/api/v1/docs", timeout=10)
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    # Swagger UI's stylesheet, its two scripts and the icon: none from a CDN, which clinicians'
    # networks may not reach.
    assert len(assets) == 4, page.text
    for asset in assets:
        assert asset.startswith("/static/drf_spectacular_sidecar/swagger-ui-dist/"), asset
        answer = httpx.get(f"{contract_portal}{asset}", timeout=10)
        assert answer.status_code == 200, asset
        assert answer.content, asset
