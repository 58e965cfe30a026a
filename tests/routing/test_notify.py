"""The writes that change an idle poll's answer tell the web workers' caches (routing.notify), at commit."""

from datetime import timedelta

import psycopg
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from centers.models import ApiKey
from centers.services import apikey_revoke
from routing import notify
from routing.delivery_services import deliveries_expire_leases
from routing.models import Delivery
from tests.dicomfiles import dicom_bytes

pytestmark = [
    pytest.mark.django_db,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="LISTEN/NOTIFY is PostgreSQL's"),
]


def sent(captured) -> str:
    return "\n".join(q["sql"] for q in captured.captured_queries if "pg_notify" in q["sql"])


@pytest.fixture
def listener():
    db = connection.settings_dict
    with psycopg.connect(
        dbname=db["NAME"], user=db["USER"] or None, host=db["HOST"] or None, port=db["PORT"] or None, autocommit=True
    ) as listening:
        listening.execute(f"LISTEN {notify.CHANNEL}")

        def heard(*, expected: int = 0) -> list[str]:
            # Silence is checked for a short while; what is expected is waited for generously.
            if expected:
                return [n.payload for n in listening.notifies(timeout=30, stop_after=expected)]
            return [n.payload for n in listening.notifies(timeout=0.3)]

        yield heard


@pytest.mark.django_db(transaction=True)
def test_it_tells_the_listeners_when_the_transaction_commits_and_never_on_a_rollback(listener):
    with transaction.atomic():
        notify.deliveries_queued([3, 1, 3])
        assert listener() == []
    assert listener(expected=1) == ["d:1,3"]
    with pytest.raises(RuntimeError), transaction.atomic():
        notify.center_access_changed([5])
        raise RuntimeError
    assert listener() == []


def test_a_fan_out_tells_the_recipients(agents, network):
    with CaptureQueriesContext(connection) as captured:
        assert agents["own"].upload(dicom_bytes("CT")).status_code == 201
    assert f"'d:{network['partner'].pk}'" in sent(captured)


def test_a_checksum_mismatch_tells_the_center_its_delivery_is_queued_again(agents, network):
    agents["own"].upload(dicom_bytes("CT"))
    (item,) = agents["partner"].lease().json()
    with CaptureQueriesContext(connection) as captured:
        assert agents["partner"].ack(item["id"], "0" * 64).status_code == 409
    assert f"'d:{network['partner'].pk}'" in sent(captured)


def test_an_expired_lease_tells_its_center(agents, network):
    agents["own"].upload(dicom_bytes("CT"))
    agents["partner"].lease()
    Delivery.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    with CaptureQueriesContext(connection) as captured:
        assert deliveries_expire_leases() == 1
    assert f"'d:{network['partner'].pk}'" in sent(captured)


def test_revoking_a_key_or_editing_a_center_tells_that_centers_listeners(keys, network):
    partner = network["partner"]
    with CaptureQueriesContext(connection) as captured:
        apikey_revoke(api_key=ApiKey.objects.get(center=partner))
    assert f"'k:{partner.pk}'" in sent(captured)
    with CaptureQueriesContext(connection) as captured:
        partner.may_subscribe = False
        partner.save()
    assert f"'k:{partner.pk}'" in sent(captured)


def test_nothing_is_sent_for_no_center():
    with CaptureQueriesContext(connection) as captured:
        notify.deliveries_queued([])
    assert sent(captured) == ""
