import json

from django.test import Client

from tests.dicomfiles import dicom_bytes
from tests.dicomweb.conftest import stow_body, stow_type


def clinician(django_user_model, center, name="reza"):
    from centers.models import Membership

    user = django_user_model.objects.create_user(name, password="s3cret-pass")
    Membership.objects.create(user=user, center=center)
    return user


def test_a_clinician_session_stores_with_the_csrf_token_and_not_without(network, storage_dir, django_user_model):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(clinician(django_user_model, network["own"]))
    body = stow_body(dicom_bytes("CT"))
    refused = browser.post("/dicomweb/studies", data=body, content_type=stow_type())
    assert refused.status_code == 403
    assert "CSRF" in json.loads(refused.content)["error"]

    # The double-submit pair a portal page gives the browser: cookie and header agree.
    token = "dicomwebCsrfToken0123456789abcde"
    browser.cookies["csrftoken"] = token
    stored = browser.post("/dicomweb/studies", data=body, content_type=stow_type(), HTTP_X_CSRFTOKEN=token)
    assert stored.status_code == 200, stored.content

    from centers.models import AuditEvent

    event = AuditEvent.objects.get(action="instance.publish")
    assert event.user.username == "reza" and event.api_key is None


def test_a_user_without_a_center_is_refused(client, django_user_model, network):
    client.force_login(django_user_model.objects.create_user("nobody", password="s3cret-pass"))
    assert client.get("/dicomweb/studies").status_code == 403


def test_cors_answers_only_the_configured_origins_and_only_under_dicomweb(client, settings, keys):
    settings.CORS_ALLOWED_ORIGINS = ["http://viewer.example.org"]
    preflight = {
        "HTTP_ORIGIN": "http://viewer.example.org",
        "HTTP_ACCESS_CONTROL_REQUEST_METHOD": "GET",
        "HTTP_ACCESS_CONTROL_REQUEST_HEADERS": "authorization",
    }
    response = client.options("/dicomweb/studies", **preflight)
    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == "http://viewer.example.org"
    assert "authorization" in response["Access-Control-Allow-Headers"]
    other = client.options("/dicomweb/studies", **{**preflight, "HTTP_ORIGIN": "http://evil.example.org"})
    assert "Access-Control-Allow-Origin" not in other
    api = client.options("/api/v1/deliveries", **preflight)
    assert "Access-Control-Allow-Origin" not in api
    search = client.get(
        "/dicomweb/studies", HTTP_ORIGIN="http://viewer.example.org", HTTP_AUTHORIZATION=f"Bearer {keys['own']}"
    )
    assert search["Access-Control-Allow-Origin"] == "http://viewer.example.org"
    assert search["Content-Type"] == "application/dicom+json"


def test_a_wrong_method_is_405(web):
    response = web["own"].client.delete("/dicomweb/studies", **web["own"].auth)
    assert response.status_code == 405
    assert response["Allow"] == "GET, POST"
