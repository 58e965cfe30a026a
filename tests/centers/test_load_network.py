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


OPTIONS = """
regions:
  - {slug: fars, name: Fars, cities: [{slug: shiraz, name: Shiraz}]}
  - {slug: tehran, name: Tehran, cities: [{slug: tehran, name: Tehran}]}
centers:
  - slug: tehran-hospital
    name: Tehran Hospital
    city: tehran/tehran
    subscribe: true
    subscriptions:
      - "*.*.mr"
      - {pattern: "fars.#", deidentify: basic, deliver: study}
      - {pattern: "#.nm", deliver: study}
"""


def options():
    return sorted(Subscription.objects.values_list("pattern", "deidentify", "deliver", "is_active"))


def test_subscriptions_may_be_patterns_or_mappings_with_options(tmp_path):
    assert "3 subscriptions" in load(tmp_path, OPTIONS)
    assert options() == [
        ("#.nm", "none", "study", True),
        ("*.*.mr", "none", "instance", True),
        ("fars.#", "basic", "study", True),
    ]


def test_reloading_is_idempotent_and_updates_the_options_in_place(tmp_path):
    load(tmp_path, OPTIONS)
    ids = dict(Subscription.objects.values_list("pattern", "pk"))
    load(tmp_path, OPTIONS)
    assert Subscription.objects.count() == 3
    load(
        tmp_path,
        OPTIONS.replace("deidentify: basic, deliver: study", "deliver: instance").replace(
            '"*.*.mr"', '{pattern: "*.*.mr", deidentify: basic}'
        ),
    )
    assert options() == [
        ("#.nm", "none", "study", True),
        ("*.*.mr", "basic", "instance", True),
        ("fars.#", "none", "instance", True),
    ]
    assert dict(Subscription.objects.values_list("pattern", "pk")) == ids


@pytest.mark.parametrize(
    "item, sentence",
    [
        ('{pattern: "fars.#", deidentify: full}', r"deidentify of 'fars.#' is 'full': use one of none, basic\."),
        ('{pattern: "fars.#", deliver: series}', r"deliver of 'fars.#' is 'series': use one of instance, study\."),
        ('{pattern: "fars.#", deidentfy: basic}', r"Unknown subscription option\(s\) deidentfy: use pattern"),
        ("{deidentify: basic}", "A pattern may not be empty"),
        ('{pattern: "fars..ct", deliver: study}', r"'fars\.\.ct' has an empty word"),
        ("[fars, ct]", r"A subscription is a pattern or a mapping with pattern, deidentify, deliver: \['fars'"),
        ("~", "A subscription is a pattern or a mapping with pattern, deidentify, deliver: None"),
    ],
)
def test_a_bad_option_is_refused_with_a_sentence_and_changes_nothing(tmp_path, item, sentence):
    with pytest.raises(CommandError, match=rf"Center tehran-hospital: {sentence}"):
        load(tmp_path, OPTIONS.replace('{pattern: "#.nm", deliver: study}', item))
    assert not Subscription.objects.exists() and not Center.objects.exists()


def test_the_demo_network_shows_a_subscription_with_options(settings):
    call_command("load_network", str(settings.BASE_DIR / "demo" / "network.yaml"), stdout=StringIO())
    nuclear = Subscription.objects.filter(center__slug="isfahan-nuclear")
    assert sorted(nuclear.values_list("pattern", "deidentify", "deliver")) == [
        ("#.nm", "none", "instance"),
        ("*.*.pt", "basic", "study"),
    ]
