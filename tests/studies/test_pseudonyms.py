"""The pseudonym look-up: the publishing center's administrators only, every look-up audited."""

import pytest
from django.contrib import admin
from django.test import Client

from centers.models import AuditEvent, Membership
from routing.models import Pseudonym, Subscription
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def published(agents, network):
    Subscription.objects.filter(center=network["partner"]).update(deidentify=Subscription.Deidentify.BASIC)
    assert agents["own"].upload(dicom_bytes("CT", patient_id="PAT-777")).status_code == 201
    return Pseudonym.objects.get(kind=Pseudonym.Kind.PATIENT)


def browser_of(django_user_model, center, role: str) -> Client:
    user = django_user_model.objects.create_user(f"{role}-{center.slug}", password="a long password")
    Membership.objects.create(user=user, center=center, role=role)
    browser = Client()
    browser.force_login(user)
    return browser


def test_the_publisher_s_administrator_finds_the_pseudonym_of_an_original(published, network, django_user_model):
    browser = browser_of(django_user_model, network["own"], Membership.Role.CENTER_ADMIN)
    response = browser.get("/pseudonyms/", {"q": "PAT-777"})
    assert response.status_code == 200
    assert published.pseudonym in response.content.decode()
    assert "Tehran Hospital" in response.content.decode()


def test_the_publisher_s_administrator_finds_the_original_of_a_pseudonym(published, network, django_user_model):
    browser = browser_of(django_user_model, network["own"], Membership.Role.CENTER_ADMIN)
    response = browser.get("/pseudonyms/", {"q": published.pseudonym})
    assert "PAT-777" in response.content.decode()


def test_every_look_up_is_audited(published, network, django_user_model):
    browser = browser_of(django_user_model, network["own"], Membership.Role.CENTER_ADMIN)
    browser.get("/pseudonyms/")
    browser.get("/pseudonyms/", {"q": "PAT-777"})
    browser.get("/pseudonyms/", {"q": "nobody"})
    events = AuditEvent.objects.filter(action="pseudonym.lookup").order_by("pk")
    assert [(e.center, e.detail["query"], e.detail["results"]) for e in events] == [
        (network["own"], "PAT-777", 1),
        (network["own"], "nobody", 0),
    ]
    assert all(e.user is not None for e in events)


def test_a_clinician_of_the_publisher_is_refused(published, network, django_user_model):
    browser = browser_of(django_user_model, network["own"], Membership.Role.CLINICIAN)
    response = browser.get("/pseudonyms/", {"q": "PAT-777"})
    assert response.status_code == 403
    assert published.pseudonym not in response.content.decode()
    assert not AuditEvent.objects.filter(action="pseudonym.lookup").exists()


@pytest.mark.parametrize("center", ["partner", "outsider"])
def test_another_center_s_administrator_finds_nothing(published, network, django_user_model, center):
    browser = browser_of(django_user_model, network[center], Membership.Role.CENTER_ADMIN)
    for query in ("PAT-777", published.pseudonym):
        response = browser.get("/pseudonyms/", {"q": query})
        assert response.status_code == 200
        assert 'id="pseudonyms"' not in response.content.decode()


def test_an_anonymous_visitor_is_sent_to_log_in(published):
    response = Client().get("/pseudonyms/", {"q": "PAT-777"})
    assert response.status_code == 302
    assert "/login/" in response["Location"]


def test_the_mapping_is_not_in_the_admin():
    assert Pseudonym not in admin.site._registry
