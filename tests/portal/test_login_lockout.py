"""Repeated failed logins lock that username out from that address (django-axes), on both login pages."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

PASSWORD = "a long clinician password"


@pytest.fixture
def clinician(db):
    from django.contrib.auth.models import User

    return User.objects.create_user("dr-lockout", password=PASSWORD)


@pytest.fixture
def admin_user(db):
    from django.contrib.auth.models import User

    return User.objects.create_superuser("root-lockout", password=PASSWORD)


def attempt(client: Client, path: str, username: str, password: str, address: str = "10.0.0.1"):
    return client.post(path, {"username": username, "password": password}, REMOTE_ADDR=address)


@pytest.mark.parametrize(("path", "user"), [("/login/", "clinician"), ("/admin/login/", "admin_user")])
def test_the_sixth_attempt_after_five_failures_is_refused_even_with_the_right_password(path, user, request, settings):
    username = request.getfixturevalue(user).username
    client = Client()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert attempt(client, path, username, "wrong").status_code == 200
    locked = attempt(client, path, username, "wrong")
    assert locked.status_code == 429

    again = attempt(client, path, username, PASSWORD)

    assert again.status_code == 429
    assert int(again["Retry-After"]) == 15 * 60
    page = again.content.decode()
    assert "Too many failed logins" in page
    assert "15 minutes" in page
    assert "_auth_user_id" not in client.session


def test_the_same_user_from_another_address_and_another_user_are_not_locked_out(clinician, settings):
    from django.contrib.auth.models import User

    User.objects.create_user("dr-other", password=PASSWORD)
    for _ in range(settings.AXES_FAILURE_LIMIT):
        attempt(Client(), "/login/", clinician.username, "wrong")

    assert attempt(Client(), "/login/", clinician.username, PASSWORD, address="10.0.0.2").status_code == 302
    assert attempt(Client(), "/login/", "dr-other", PASSWORD).status_code == 302


def test_a_lockout_ends_after_the_cool_off(clinician, settings):
    from axes.models import AccessAttempt

    for _ in range(settings.AXES_FAILURE_LIMIT):
        attempt(Client(), "/login/", clinician.username, "wrong")
    assert attempt(Client(), "/login/", clinician.username, PASSWORD).status_code == 429
    # The attempts as if made a cool-off period ago.
    AccessAttempt.objects.update(attempt_time=timezone.now() - settings.AXES_COOLOFF_TIME - timedelta(seconds=1))

    assert attempt(Client(), "/login/", clinician.username, PASSWORD).status_code == 302


def test_a_success_before_the_limit_forgets_the_failures(clinician, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        attempt(Client(), "/login/", clinician.username, "wrong")
    assert attempt(Client(), "/login/", clinician.username, PASSWORD).status_code == 302

    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        attempt(Client(), "/login/", clinician.username, "wrong")
    assert attempt(Client(), "/login/", clinician.username, PASSWORD).status_code == 302
