from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from centers.models import Center, City, Region
from routing.models import Subscription

pytestmark = pytest.mark.django_db

NETWORK = """
regions:
  - {slug: fars, name: Fars, cities: [{slug: shiraz, name: Shiraz}]}
  - {slug: tehran, name: Tehran, cities: [{slug: tehran, name: Tehran}]}
centers:
  - {slug: shiraz-imaging, name: Shiraz Imaging Center, city: fars/shiraz, publish: true, subscribe: false,
     subscriptions: []}
  - {slug: tehran-hospital, name: Tehran Hospital, city: tehran/tehran, publish: false, subscribe: true,
     subscriptions: ["fars.#", "*.*.mr"]}
"""


def load(tmp_path, text: str) -> str:
    path = tmp_path / "network.yaml"
    path.write_text(text)
    out = StringIO()
    call_command("load_network", str(path), stdout=out)
    return out.getvalue()


def state():
    return (
        sorted(Region.objects.values_list("slug", "name")),
        sorted(City.objects.values_list("region__slug", "slug", "name")),
        sorted(Center.objects.values_list("slug", "name", "city__slug", "may_publish", "may_subscribe", "is_active")),
        sorted(Subscription.objects.values_list("center__slug", "pattern", "is_active")),
    )


def test_it_creates_the_network(tmp_path):
    assert "2 centers" in load(tmp_path, NETWORK)
    hospital = Center.objects.get(slug="tehran-hospital")
    assert hospital.may_subscribe and not hospital.may_publish
    assert sorted(hospital.subscriptions.values_list("pattern", flat=True)) == ["*.*.mr", "fars.#"]


def test_loading_twice_gives_the_same_state(tmp_path):
    load(tmp_path, NETWORK)
    first = state()
    load(tmp_path, NETWORK)
    assert state() == first
    assert Subscription.objects.count() == 2


def test_a_pattern_dropped_from_the_file_is_deactivated(tmp_path):
    load(tmp_path, NETWORK)
    load(tmp_path, NETWORK.replace(', "*.*.mr"', ""))
    assert Subscription.objects.get(pattern="*.*.mr").is_active is False


def test_it_refuses_an_invalid_pattern_and_changes_nothing(tmp_path):
    with pytest.raises(CommandError, match="empty word"):
        load(tmp_path, NETWORK.replace('"fars.#"', '"fars..ct"'))
    assert Center.objects.count() == 0


def test_it_refuses_an_unknown_city(tmp_path):
    with pytest.raises(CommandError, match="not defined"):
        load(tmp_path, NETWORK.replace("tehran/tehran", "tehran/karaj"))


def test_the_demo_network_loads(settings):
    out = StringIO()
    call_command("load_network", str(settings.BASE_DIR / "demo" / "network.yaml"), stdout=out)
    assert Center.objects.filter(may_publish=True).exists()
    assert Subscription.objects.filter(is_active=True).exists()
