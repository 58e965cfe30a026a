"""The API's OpenAPI contract (drf-spectacular): generated without a warning, served without a
key, every error documented as {"error": ...}, and a docs page whose assets are the portal's own."""

import re

import pytest
import yaml
from django.contrib.staticfiles import finders
from django.core.management import call_command

OPERATIONS = {
    ("/api/v1/instances", "post"),
    ("/api/v1/deliveries", "get"),
    ("/api/v1/deliveries/ack", "post"),
    ("/api/v1/deliveries/{delivery_id}/file", "get"),
    ("/api/v1/deliveries/{delivery_id}/ack", "post"),
    ("/api/v1/agents/heartbeat", "get"),
    ("/api/v1/agents/heartbeat", "post"),
}


@pytest.fixture
def schema(client) -> dict:
    response = client.get("/api/v1/schema", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_the_schema_generates_valid_with_no_warning(tmp_path):
    # --fail-on-warn turns every view or field drf-spectacular had to guess about into an error.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml"))

    generated = yaml.safe_load((tmp_path / "schema.yaml").read_text())
    assert generated["openapi"].startswith("3.")


def test_the_schema_is_served_without_a_key_as_yaml_and_json(client, schema):
    response = client.get("/api/v1/schema")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/vnd.oai.openapi")
    assert yaml.safe_load(response.content) == schema
    assert {(path, method) for path, method, _ in operations(schema)} == OPERATIONS


def test_every_operation_takes_a_center_key(schema):
    assert schema["components"]["securitySchemes"]["centerKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["centerKey"]["description"],
    }
    for path, method, operation in operations(schema):
        assert operation["security"] == [{"centerKey": []}], (path, method)


def test_every_error_is_documented_as_the_error_body(schema):
    error = {"$ref": "#/components/schemas/Error"}
    for path, method, operation in operations(schema):
        codes = {int(code) for code in operation["responses"]}
        assert {401, 429} <= codes, (path, method)
        for code, response in operation["responses"].items():
            if int(code) >= 400:
                assert response["content"] == {"application/json": {"schema": error}}, (path, method, code)
    assert schema["components"]["schemas"]["Error"]["required"] == ["error"]


def test_the_upload_and_the_download_are_dicom_files(schema):
    binary = {"schema": {"type": "string", "format": "binary"}}
    upload = schema["paths"]["/api/v1/instances"]["post"]
    download = schema["paths"]["/api/v1/deliveries/{delivery_id}/file"]["get"]

    # One file, or a batch of them (routing.api.instances_upload_batch).
    assert upload["requestBody"]["content"] == {"application/dicom": binary, "multipart/related": binary}
    assert {"201", "200", "400", "403", "409", "413", "415"} <= set(upload["responses"])
    assert download["responses"]["200"]["content"] == {"application/dicom": binary}
    assert {"404", "410"} <= set(download["responses"])


def test_the_docs_page_takes_its_assets_from_the_portal_not_a_cdn(client, settings):
    page = client.get("/api/v1/docs")

    assert page.status_code == 200
    html = page.content.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert len(assets) == 4, html  # Swagger UI's stylesheet, its two scripts and its icon
    for asset in assets:
        assert asset.startswith(f"{settings.STATIC_URL}drf_spectacular_sidecar/swagger-ui-dist/"), asset
        assert finders.find(asset.removeprefix(settings.STATIC_URL)), asset
    assert "/api/v1/schema" in html


def test_an_api_path_no_route_matches_is_a_json_404(client):
    response = client.get("/api/v1/deliveries/not-a-number/file")

    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert "/api/v1/deliveries/not-a-number/file" in response.json()["error"]


def test_a_page_no_route_matches_is_still_a_page(client):
    response = client.get("/no-such-page")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
