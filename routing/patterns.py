"""Topic patterns over routing keys, with RabbitMQ topic-exchange semantics.

A routing key is `<region>.<city>.<modality>`, lowercase. A pattern splits on
`.` like the key; `*` stands for exactly one word and `#` for zero or more.
Everything here is pure: routing decisions are data in, data out.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, lru_cache

WORD = re.compile(r"^[a-z0-9_-]+$")
MAX_PATTERN_LENGTH = 255


class InvalidPattern(ValueError):
    pass


def pattern_validate(pattern: str) -> None:
    """Raise InvalidPattern with a sentence an administrator understands."""
    if not pattern:
        raise InvalidPattern("A pattern may not be empty; use '#' to match everything.")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InvalidPattern(f"A pattern may be at most {MAX_PATTERN_LENGTH} characters long.")
    if pattern != pattern.lower():
        raise InvalidPattern("Patterns are lowercase, like routing keys (e.g. 'fars.*.ct').")
    for word in pattern.split("."):
        if word in ("*", "#"):
            continue
        if not word:
            raise InvalidPattern(f"'{pattern}' has an empty word: words are separated by single dots.")
        if not WORD.match(word):
            raise InvalidPattern(
                f"'{word}' in '{pattern}' is not a word: use letters, digits, '-', '_', or the wildcards * and #."
            )


def routing_key(*, region: str, city: str, modality: str) -> str:
    return f"{region}.{city}.{modality}".lower()


def routing_key_valid(key: str) -> bool:
    """Whether a key is `<region>.<city>.<modality>`, three words: any other would be
    matched by '#' and '*' subscriptions by accident."""
    words = key.split(".")
    return len(words) == 3 and all(WORD.match(word) for word in words)


@lru_cache(maxsize=4096)
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split("."))


# Patterns and routing keys are few (region.city.modality): a fan-out to 500
# subscribers asks the same few questions over and over.
@lru_cache(maxsize=65536)
def topic_matches(pattern: str, key: str) -> bool:
    """Whether a routing key matches a topic pattern."""
    p, k = _words(pattern), _words(key)

    @cache
    def match(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(k)
        word = p[i]
        if word == "#":
            return match(i + 1, j) or (j < len(k) and match(i, j + 1))
        if j == len(k):
            return False
        return (word == "*" or word == k[j]) and match(i + 1, j + 1)

    return match(0, 0)


# Each option's choices, least strict first: where two patterns of a center match, the later one wins.
DEIDENTIFY_LEVELS = ("none", "basic")
DELIVER_LEVELS = ("instance", "study")


@dataclass(frozen=True)
class SubscriptionRef:
    subscription_id: int
    center_id: int
    pattern: str
    deidentify: str = "none"
    deliver: str = "instance"


@dataclass(frozen=True)
class Match:
    """A subscription that matched a key: the answer to "why did this center get it?"."""

    subscription_id: int
    center_id: int
    pattern: str
    key: str
    deidentify: str = "none"
    deliver: str = "instance"


@dataclass(frozen=True)
class RecipientOptions:
    """How one center receives an instance, and the patterns that decided it."""

    center_id: int
    deidentify: str
    deliver: str
    deidentify_because: str
    deliver_because: str


def route(key: str, subscriptions: Iterable[SubscriptionRef], *, exclude_center_id: int | None = None) -> list[Match]:
    """Every subscription matching the key, except the publisher's own."""
    return [
        Match(
            subscription_id=s.subscription_id,
            center_id=s.center_id,
            pattern=s.pattern,
            key=key,
            deidentify=s.deidentify,
            deliver=s.deliver,
        )
        for s in subscriptions
        if s.center_id != exclude_center_id and topic_matches(s.pattern, key)
    ]


def recipients(matches: Iterable[Match]) -> list[int]:
    """One entry per center, however many of its patterns matched."""
    return sorted({m.center_id for m in matches})


def _stricter(levels: tuple[str, ...], a: str, b: str) -> str:
    return a if levels.index(a) >= levels.index(b) else b


def recipient_options(matches: Iterable[Match]) -> dict[int, RecipientOptions]:
    """Per center, the strictest options among its matching patterns, each with the pattern that set it."""
    found: dict[int, RecipientOptions] = {}
    for m in sorted(matches, key=lambda m: (m.center_id, m.pattern)):
        seen = found.get(m.center_id)
        if seen is None:
            found[m.center_id] = RecipientOptions(m.center_id, m.deidentify, m.deliver, m.pattern, m.pattern)
            continue
        deidentify = _stricter(DEIDENTIFY_LEVELS, seen.deidentify, m.deidentify)
        deliver = _stricter(DELIVER_LEVELS, seen.deliver, m.deliver)
        found[m.center_id] = RecipientOptions(
            m.center_id,
            deidentify,
            deliver,
            seen.deidentify_because if deidentify == seen.deidentify else m.pattern,
            seen.deliver_because if deliver == seen.deliver else m.pattern,
        )
    return found
