"""The admin's subscription preview answers "who would receive this, and why?"."""

import pytest

from centers.models import City, Modality
from routing.models import Subscription

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_browser(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", password="x")
    client.force_login(admin)
    return client


def test_a_city_and_modality_show_the_receiving_centers_and_their_patterns(admin_browser, network):
    Subscription.objects.create(center=network["partner"], pattern="*.shiraz.ct")
    Subscription.objects.create(center=network["outsider"], pattern="tehran.#", is_active=False)
    shiraz = City.objects.get(slug="shiraz")
    ct, _ = Modality.objects.get_or_create(code="CT", defaults={"name": "Computed Tomography"})
    response = admin_browser.get("/admin/routing/subscription/preview/", {"city": shiraz.pk, "modality": ct.code})
    assert response.status_code == 200
    assert response.context["result"]["key"] == "fars.shiraz.ct"
    rows = [(center.slug, patterns) for center, patterns in response.context["result"]["rows"]]
    assert rows == [("tehran-hospital", ["*.shiraz.ct", "fars.#"])]


def test_a_typed_key_and_a_publisher_that_never_receives_its_own(admin_browser, network):
    response = admin_browser.get("/admin/routing/subscription/preview/", {"key": "isfahan.isfahan.nm"})
    assert [c.slug for c, _ in response.context["result"]["rows"]] == ["isfahan-nuclear"]
    response = admin_browser.get(
        "/admin/routing/subscription/preview/", {"key": "isfahan.isfahan.nm", "publisher": network["outsider"].pk}
    )
    assert response.context["result"]["rows"] == []
    assert b"nobody would receive it" in response.content


def test_the_preview_is_linked_from_the_subscription_list_and_needs_staff(admin_browser, client):
    assert b"/admin/routing/subscription/preview/" in admin_browser.get("/admin/routing/subscription/").content
    admin_browser.logout()
    assert admin_browser.get("/admin/routing/subscription/preview/").status_code == 302
