"""Subscription options: per center, the stricter of its matching patterns' choices wins, and says which pattern."""

import pytest

from routing.models import Subscription
from routing.patterns import Match, RecipientOptions, SubscriptionRef, recipient_options, route
from routing.services import SubscriptionSpec, subscription_spec_parse

KEY = "fars.shiraz.ct"


def match(center: int, pattern: str, deidentify: str = "none", deliver: str = "instance") -> Match:
    return Match(
        subscription_id=hash(pattern) % 1000,
        center_id=center,
        pattern=pattern,
        key=KEY,
        deidentify=deidentify,
        deliver=deliver,
    )


def test_one_pattern_sets_both_options_and_is_the_reason_for_both():
    assert recipient_options([match(1, "fars.#", "basic", "study")]) == {
        1: RecipientOptions(1, "basic", "study", "fars.#", "fars.#")
    }


def test_the_defaults_are_no_deidentification_and_each_instance_as_it_arrives():
    [options] = recipient_options([match(1, "#")]).values()
    assert (options.deidentify, options.deliver) == ("none", "instance")


@pytest.mark.parametrize("order", [1, -1])
def test_basic_wins_over_none_and_study_over_instance_whichever_comes_first(order):
    matches = [match(1, "fars.#", deidentify="basic"), match(1, "*.*.ct", deliver="study")][::order]
    assert recipient_options(matches) == {1: RecipientOptions(1, "basic", "study", "fars.#", "*.*.ct")}


def test_an_equally_strict_later_pattern_does_not_take_the_reason_away():
    [options] = recipient_options([match(1, "a.#", "basic"), match(1, "b.#", "basic"), match(1, "c.#")]).values()
    assert (options.deidentify, options.deidentify_because) == ("basic", "a.#")
    assert (options.deliver, options.deliver_because) == ("instance", "a.#")


def test_each_center_gets_its_own_options():
    options = recipient_options([match(1, "fars.#", "basic"), match(2, "fars.#", deliver="study")])
    assert options == {
        1: RecipientOptions(1, "basic", "instance", "fars.#", "fars.#"),
        2: RecipientOptions(2, "none", "study", "fars.#", "fars.#"),
    }


def test_the_options_travel_from_the_subscription_through_the_match():
    refs = [SubscriptionRef(7, 1, "fars.#", "basic", "study"), SubscriptionRef(8, 1, "#.mr", "none", "instance")]
    [only] = route(KEY, refs)
    assert (only.deidentify, only.deliver) == ("basic", "study")
    assert recipient_options(route(KEY, refs))[1].deidentify_because == "fars.#"


@pytest.mark.parametrize(
    "item, spec",
    [
        ("fars.#", SubscriptionSpec("fars.#")),
        ({"pattern": "Fars.#", "deidentify": "BASIC"}, SubscriptionSpec("fars.#", "basic", "instance")),
        ({"pattern": "#.mr", "deliver": "study"}, SubscriptionSpec("#.mr", "none", "study")),
    ],
)
def test_a_network_file_item_is_a_pattern_or_a_mapping(item, spec):
    assert subscription_spec_parse(item) == spec


@pytest.mark.django_db
def test_the_admin_edits_the_options_of_a_subscription(admin_client, network):
    subscription = Subscription.objects.get(center=network["partner"])
    form = admin_client.get(f"/admin/routing/subscription/{subscription.pk}/change/").content.decode()
    assert 'name="deidentify"' in form and 'name="deliver"' in form
    assert "Basic: PS3.15 Basic Application Level Confidentiality Profile" in form

    response = admin_client.post(
        f"/admin/routing/subscription/{subscription.pk}/change/",
        {
            "center": network["partner"].pk,
            "pattern": "fars.#",
            "deidentify": "basic",
            "deliver": "study",
            "is_active": "on",
            "note": "",
        },
    )
    assert response.status_code == 302, response.content.decode()
    subscription.refresh_from_db()
    assert (subscription.deidentify, subscription.deliver) == ("basic", "study")

    refused = admin_client.post(
        f"/admin/routing/subscription/{subscription.pk}/change/",
        {"center": network["partner"].pk, "pattern": "fars.#", "deidentify": "full", "deliver": "study"},
    )
    assert refused.status_code == 200 and "Select a valid choice" in refused.content.decode()
    subscription.refresh_from_db()
    assert subscription.deidentify == "basic"


@pytest.mark.django_db
def test_the_admin_lists_and_filters_subscriptions_by_their_options(admin_client, network):
    Subscription.objects.filter(center=network["partner"]).update(deidentify="basic")
    listing = admin_client.get("/admin/routing/subscription/?deidentify__exact=basic").content.decode()
    assert "tehran-hospital" in listing and "isfahan-nuclear" not in listing


@pytest.mark.django_db
def test_a_centers_admin_page_edits_the_options_of_its_subscriptions_inline(admin_client, network):
    page = admin_client.get(f"/admin/centers/center/{network['partner'].pk}/change/").content.decode()
    assert 'name="subscriptions-0-deidentify"' in page and 'name="subscriptions-0-deliver"' in page
