import pytest

from routing.patterns import (
    InvalidPattern,
    Match,
    SubscriptionRef,
    pattern_validate,
    recipients,
    route,
    routing_key_valid,
    topic_matches,
)


@pytest.mark.parametrize(
    "pattern, key",
    [
        ("fars.shiraz.ct", "fars.shiraz.ct"),
        ("fars.*.ct", "fars.shiraz.ct"),
        ("*.*.mr", "tehran.tehran.mr"),
        ("fars.#", "fars.shiraz.ct"),
        ("#.nm", "isfahan.isfahan.nm"),
        ("#", "fars.shiraz.ct"),
        ("fars.#.ct", "fars.shiraz.ct"),
        ("#.shiraz.#", "fars.shiraz.ct"),
        ("fars.shiraz.ct.#", "fars.shiraz.ct"),
        ("#.#", "fars.shiraz.ct"),
        ("#.*", "fars.shiraz.ct"),
        ("*.#", "fars.shiraz.ct"),
    ],
)
def test_it_matches(pattern, key):
    assert topic_matches(pattern, key)


@pytest.mark.parametrize(
    "pattern, key",
    [
        ("fars.shiraz.ct", "fars.shiraz.mr"),
        ("fars.*", "fars.shiraz.ct"),
        ("*.ct", "fars.shiraz.ct"),
        ("*.*.*.*", "fars.shiraz.ct"),
        ("#.nm", "fars.shiraz.ct"),
        ("tehran.#", "fars.shiraz.ct"),
        ("fars.*.*.ct", "fars.shiraz.ct"),
        ("fars", "fars.shiraz.ct"),
        ("fars.shiraz", "fars.shiraz.ct"),
        ("fars.shira.ct", "fars.shiraz.ct"),
    ],
)
def test_it_does_not_match(pattern, key):
    assert not topic_matches(pattern, key)


def test_a_star_never_matches_zero_words():
    assert not topic_matches("fars.*.shiraz.ct", "fars.shiraz.ct")


def test_a_hash_matches_zero_words_in_the_middle():
    assert topic_matches("fars.#.shiraz.ct", "fars.shiraz.ct")


@pytest.mark.parametrize("pattern", ["fars.#", "*.*.mr", "#", "fars.shiraz-north.ct", "region_1.*.nm"])
def test_it_accepts_valid_patterns(pattern):
    pattern_validate(pattern)


@pytest.mark.parametrize(
    "pattern, complaint",
    [
        ("", "empty"),
        ("Fars.#", "lowercase"),
        ("fars..ct", "empty word"),
        (".fars", "empty word"),
        ("fars.", "empty word"),
        ("fars.shi raz.ct", "not a word"),
        ("fars.sh*.ct", "not a word"),
        ("fars/#", "not a word"),
        ("x" * 256, "at most"),
    ],
)
def test_it_rejects_invalid_patterns_with_a_reason(pattern, complaint):
    with pytest.raises(InvalidPattern, match=complaint):
        pattern_validate(pattern)


def test_routing_names_every_matching_pattern_and_skips_the_publisher():
    subscriptions = [
        SubscriptionRef(subscription_id=1, center_id=10, pattern="fars.#"),
        SubscriptionRef(subscription_id=2, center_id=10, pattern="*.*.ct"),
        SubscriptionRef(subscription_id=3, center_id=20, pattern="#.nm"),
        SubscriptionRef(subscription_id=4, center_id=30, pattern="#"),
    ]
    matches = route("fars.shiraz.ct", subscriptions, exclude_center_id=30)
    assert matches == [
        Match(subscription_id=1, center_id=10, pattern="fars.#", key="fars.shiraz.ct"),
        Match(subscription_id=2, center_id=10, pattern="*.*.ct", key="fars.shiraz.ct"),
    ]
    assert recipients(matches) == [10]


def test_a_routing_key_is_three_words():
    assert routing_key_valid("fars.shiraz.ct")
    assert not routing_key_valid("fars.shiraz")
    assert not routing_key_valid("fars.shiraz.ct.extra")
    assert not routing_key_valid("fars..ct")
    assert not routing_key_valid("fars.*.ct")
