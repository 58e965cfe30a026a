import hashlib
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from centers.models import ApiKey, AuditEvent
from centers.selectors import apikey_get_active
from centers.services import apikey_issue, apikey_revoke

pytestmark = pytest.mark.django_db


def test_a_key_is_stored_only_as_its_digest(network):
    issued = apikey_issue(center=network["own"], label="gateway")
    row = ApiKey.objects.get()
    assert row.digest == hashlib.sha256(issued.secret.encode()).hexdigest()
    assert issued.secret not in str(list(ApiKey.objects.values()))
    assert len(issued.secret) >= 40


def test_a_center_may_hold_several_keys_for_rotation(network):
    old = apikey_issue(center=network["own"])
    new = apikey_issue(center=network["own"])
    assert apikey_get_active(secret=old.secret).center == network["own"]
    assert apikey_get_active(secret=new.secret).center == network["own"]
    apikey_revoke(api_key=old.api_key)
    assert apikey_get_active(secret=old.secret) is None
    assert apikey_get_active(secret=new.secret) is not None


def test_an_inactive_centers_keys_stop_working(network):
    issued = apikey_issue(center=network["own"])
    network["own"].is_active = False
    network["own"].save()
    assert apikey_get_active(secret=issued.secret) is None


def test_using_a_key_records_when_it_was_last_used(agents, keys):
    agents["partner"].lease()
    assert ApiKey.objects.get(center__slug="tehran-hospital").last_used_at is not None


def test_issuing_and_revoking_are_audited(network):
    issued = apikey_issue(center=network["own"])
    apikey_revoke(api_key=issued.api_key)
    assert set(AuditEvent.objects.values_list("action", flat=True)) == {"apikey.issue", "apikey.revoke"}


def test_issue_key_prints_the_key_and_nothing_else(network):
    out = StringIO()
    call_command("issue_key", "shiraz-imaging", stdout=out)
    secret = out.getvalue().strip()
    assert out.getvalue() == secret + "\n"
    assert apikey_get_active(secret=secret).center == network["own"]


def test_issue_key_refuses_an_unknown_center(network):
    with pytest.raises(CommandError, match="No center"):
        call_command("issue_key", "nowhere")
