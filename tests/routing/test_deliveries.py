"""The agent's delivery queue: lease, fetch, acknowledge, and isolation between centers."""

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from routing.delivery_services import deliveries_expire_leases
from routing.models import Delivery, Priority
from tests.dicomfiles import dicom_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def published(agents):
    files = [dicom_bytes("CT", instance_number=n) for n in range(3)]
    for data in files:
        assert agents["own"].upload(data).status_code == 201
    return files


def test_a_lease_lists_what_the_center_needs(agents, published):
    items = agents["partner"].lease(limit=10).json()
    assert len(items) == 3
    assert set(items[0]) == {
        "id",
        "sop_instance_uid",
        "study_instance_uid",
        "series_instance_uid",
        "patient_id",
        "modality",
        "routing_key",
        "size",
        "sha256",
        "priority",
        "download_url",
        "deliver",
    }
    assert items[0]["deliver"] == "instance"
    assert items[0]["download_url"] == f"http://testserver/api/v1/deliveries/{items[0]['id']}/file"
    assert {i["sha256"] for i in items} == {hashlib.sha256(d).hexdigest() for d in published}


def test_a_leased_delivery_is_not_leased_again(agents, published):
    first = agents["partner"].lease(limit=2).json()
    second = agents["partner"].lease(limit=10).json()
    assert len(first) == 2 and len(second) == 1
    assert not {i["id"] for i in first} & {i["id"] for i in second}


def test_an_empty_queue_answers_an_empty_list(agents):
    response = agents["partner"].lease(wait=0)
    assert response.status_code == 200
    assert response.json() == []


@pytest.mark.parametrize("params", [{"limit": "ten"}, {"wait": "-1"}])
def test_it_rejects_nonsense_parameters(agents, params):
    assert agents["partner"].lease(**params).status_code == 400


def test_the_file_is_the_published_bytes(agents, published):
    item = agents["partner"].lease(limit=1).json()[0]
    response = agents["partner"].file(item["id"])
    assert response.status_code == 200
    assert response["Content-Type"] == "application/dicom"
    assert hashlib.sha256(b"".join(response.streaming_content)).hexdigest() == item["sha256"]


def test_an_ack_with_the_right_checksum_marks_it_delivered(agents, published):
    item = agents["partner"].lease(limit=1).json()[0]
    response = agents["partner"].ack(item["id"], item["sha256"])
    assert response.status_code == 200
    delivery = Delivery.objects.get(pk=item["id"])
    assert delivery.status == Delivery.Status.DELIVERED
    assert delivery.delivered_at is not None


def test_an_ack_with_a_wrong_checksum_is_409_and_queues_it_again(agents, published):
    item = agents["partner"].lease(limit=1).json()[0]
    response = agents["partner"].ack(item["id"], "0" * 64)
    assert response.status_code == 409
    assert Delivery.objects.get(pk=item["id"]).status == Delivery.Status.QUEUED
    assert item["id"] in [i["id"] for i in agents["partner"].lease(limit=10).json()]


def test_an_ack_without_a_checksum_is_400(agents, published):
    item = agents["partner"].lease(limit=1).json()[0]
    assert agents["partner"].ack(item["id"], "not-hex").status_code == 400


def test_an_expired_lease_is_queued_again(agents, published):
    leased = agents["partner"].lease(limit=10).json()
    Delivery.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert deliveries_expire_leases() == 3
    assert len(agents["partner"].lease(limit=10).json()) == len(leased)


def test_an_expired_lease_can_be_leased_before_the_sweep_runs(agents, published):
    agents["partner"].lease(limit=10)
    Delivery.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert len(agents["partner"].lease(limit=10).json()) == 3


def test_another_centers_delivery_looks_missing(agents, published):
    item = agents["partner"].lease(limit=1).json()[0]
    for call in (
        lambda: agents["outsider"].file(item["id"]),
        lambda: agents["outsider"].ack(item["id"], item["sha256"]),
    ):
        response = call()
        assert response.status_code == 404
        assert response.json() == agents["outsider"].file(999_999).json()
    assert Delivery.objects.get(pk=item["id"]).status == Delivery.Status.LEASED


def test_a_center_that_may_not_subscribe_cannot_lease(agents, published):
    assert agents["own"].lease().status_code == 403


def test_the_limit_is_capped_at_100(agents, network):
    for n in range(3):
        agents["own"].upload(dicom_bytes("CT", instance_number=n))
    assert len(agents["partner"].lease(limit=1000).json()) == 3


def test_leases_and_downloads_are_audited(agents, published, network):
    from centers.models import AuditEvent

    item = agents["partner"].lease(limit=1).json()[0]
    agents["partner"].file(item["id"])
    actions = list(AuditEvent.objects.filter(center=network["partner"]).values_list("action", flat=True))
    assert "delivery.lease" in actions and "delivery.download" in actions


def test_a_lease_answers_what_the_delivery_serializer_says(agents, published, settings, rf):
    from routing.api import DeliverySerializer

    settings.DICOM_DOWNLOAD_LINK_SECRET = "s3cret"
    Delivery.objects.filter(pk=Delivery.objects.order_by("pk").last().pk).update(priority=Priority.STAT)
    items = agents["partner"].lease(limit=10).json()
    leased = Delivery.objects.filter(pk__in=[i["id"] for i in items]).select_related("instance__series__study__patient")
    by_pk = {d.pk: d for d in leased}
    request = rf.get("/api/v1/deliveries")
    expected = [DeliverySerializer(by_pk[i["id"]], context={"request": request}).data for i in items]
    assert items == expected
    assert items[0]["priority"] == "stat"


def test_a_lease_without_a_whole_study_does_not_look_for_the_rest_of_one(published, network, django_assert_num_queries):
    from routing.delivery_services import deliveries_lease

    # The idle check, two ordered reads, the UPDATE, the read back and the audit row,
    # inside a savepoint (the test's transaction) and its release.
    with django_assert_num_queries(8):
        assert len(deliveries_lease(center=network["partner"], limit=50)) == 3


def test_a_whole_lease_is_acknowledged_in_one_request(agents, published):
    items = agents["partner"].lease(limit=10).json()
    response = agents["partner"].ack_many([(i["id"], i["sha256"]) for i in items])
    assert response.status_code == 200
    assert response.json() == {"results": [{"id": i["id"], "status": "delivered"} for i in items]}
    assert set(Delivery.objects.filter(pk__in=[i["id"] for i in items]).values_list("status", flat=True)) == {
        Delivery.Status.DELIVERED
    }


def test_a_batch_ack_decides_each_delivery_on_its_own(agents, published):
    right, wrong = agents["partner"].lease(limit=2).json()
    foreign = agents["partner"].ack_many([(999_999, right["sha256"])]).json()["results"][0]
    results = agents["partner"].ack_many([(right["id"], right["sha256"]), (wrong["id"], "0" * 64)]).json()["results"]
    assert [r["status"] for r in results] == ["delivered", "requeued"]
    assert "does not match" in results[1]["error"]
    assert foreign == {"id": 999_999, "status": "not_found", "error": "No such delivery."}
    requeued = Delivery.objects.get(pk=wrong["id"])
    assert requeued.status == Delivery.Status.QUEUED and "checksum mismatch" in requeued.last_error


def test_a_batch_ack_cannot_touch_another_centers_delivery(agents, published):
    item = agents["partner"].lease(limit=1).json()[0]
    result = agents["outsider"].ack_many([(item["id"], item["sha256"])]).json()["results"][0]
    assert result["status"] == "not_found"
    assert Delivery.objects.get(pk=item["id"]).status == Delivery.Status.LEASED


def test_a_repeated_batch_ack_changes_nothing_and_audits_once(agents, published, network):
    from centers.models import AuditEvent

    items = agents["partner"].lease(limit=10).json()
    acks = [(i["id"], i["sha256"]) for i in items]
    agents["partner"].ack_many(acks)
    again = agents["partner"].ack_many(acks).json()["results"]
    assert {r["status"] for r in again} == {"delivered"}
    audited = AuditEvent.objects.filter(center=network["partner"], action="delivery.ack")
    assert sorted(int(pk) for pk in audited.values_list("object_id", flat=True)) == sorted(pk for pk, _ in acks)


@pytest.mark.parametrize(
    "body",
    [{}, {"acks": []}, {"acks": [{"id": 1}]}, {"acks": [{"id": "x", "sha256": "0" * 64}]}, {"acks": "nope"}],
)
def test_a_malformed_batch_ack_is_400(agents, published, body):
    response = agents["partner"].client.post(
        "/api/v1/deliveries/ack", data=body, content_type="application/json", **agents["partner"].auth
    )
    assert response.status_code == 400
    assert "error" in response.json()


def test_a_batch_ack_takes_at_most_a_full_lease(agents, published):
    response = agents["partner"].ack_many([(n, "0" * 64) for n in range(1, 102)])
    assert response.status_code == 400


def test_with_a_link_secret_a_lease_hands_out_links_signed_until_the_lease_ends(agents, published, settings):
    settings.DICOM_DOWNLOAD_LINK_SECRET = "s3cret"
    item = agents["partner"].lease(limit=1).json()[0]
    delivery = Delivery.objects.select_related("instance").get(pk=item["id"])
    path, query = item["download_url"].removeprefix("http://testserver").split("?")
    assert path == f"/dl/{delivery.pk}/{delivery.instance.file}"
    params = dict(part.split("=") for part in query.split("&"))
    assert int(params["expires"]) == int(delivery.lease_expires_at.timestamp())
    assert len(params["md5"]) == 22


def fail_checksum(agent, times: int) -> list[dict]:
    """Lease the one delivery and report other bytes, `times` times; the last answers."""
    answers = []
    for _ in range(times):
        [item] = agent.lease(limit=1).json()
        answers.append(agent.ack_many([(item["id"], "0" * 64)]).json()["results"][0])
    return answers


def test_a_delivery_whose_checksum_never_matches_fails_after_the_limit(agents, network, settings, storage_dir):
    from centers.models import AuditEvent

    settings.DELIVERY_MAX_MISMATCHES = 3
    agents["own"].upload(dicom_bytes("CT"))
    answers = fail_checksum(agents["partner"], 3)
    assert [a["status"] for a in answers] == ["requeued", "requeued", "failed"]
    assert "has failed" in answers[-1]["error"]
    delivery = Delivery.objects.get()
    assert delivery.status == Delivery.Status.FAILED and delivery.mismatches == 3
    assert delivery.failed_at is not None and "never matched" in delivery.last_error
    # Not offered again, and a further wrong ack leaves it failed.
    assert agents["partner"].lease(limit=10).json() == []
    assert agents["partner"].ack(delivery.pk, "0" * 64).status_code == 409
    assert Delivery.objects.get().status == Delivery.Status.FAILED
    fail = AuditEvent.objects.get(action="delivery.fail", object_id=str(delivery.pk))
    assert fail.center == network["partner"] and "never matched" in fail.detail["reason"]


def test_a_missing_stored_file_fails_the_delivery_with_a_json_410(agents, published, storage_dir):
    from centers.models import AuditEvent

    item = agents["partner"].lease(limit=1).json()[0]
    delivery = Delivery.objects.select_related("instance").get(pk=item["id"])
    (storage_dir / delivery.instance.file).unlink()
    response = agents["partner"].file(item["id"])
    assert response.status_code == 410
    assert "missing" in response.json()["error"]
    delivery.refresh_from_db()
    assert delivery.status == Delivery.Status.FAILED and delivery.last_error == "the stored file is missing"
    assert item["id"] not in [i["id"] for i in agents["partner"].lease(limit=10).json()]
    assert AuditEvent.objects.filter(action="delivery.fail", object_id=str(item["id"])).exists()


def test_behind_nginx_a_missing_stored_file_also_fails_the_delivery(agents, published, storage_dir, settings):
    settings.DICOM_ACCEL_REDIRECT = "/_dicom/"
    item = agents["partner"].lease(limit=1).json()[0]
    (storage_dir / Delivery.objects.select_related("instance").get(pk=item["id"]).instance.file).unlink()
    assert agents["partner"].file(item["id"]).status_code == 410
    assert Delivery.objects.get(pk=item["id"]).status == Delivery.Status.FAILED


def test_a_delivery_leased_too_often_without_an_ack_fails(agents, published, settings):
    settings.DELIVERY_MAX_LEASES = 2
    for _ in range(2):
        assert len(agents["partner"].lease(limit=10).json()) == 3
        Delivery.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        # The second expiry is the limit: the lease is not handed out again, the sweep fails it.
    assert agents["partner"].lease(limit=10).json() == []
    assert deliveries_expire_leases() == 0
    assert set(Delivery.objects.values_list("status", "attempts")) == {(Delivery.Status.FAILED, 2)}
    assert "never acknowledged" in Delivery.objects.first().last_error


def test_the_admin_filters_failed_deliveries_and_retries_them(agents, published, settings, admin_client, admin_user):
    from centers.models import AuditEvent

    settings.DELIVERY_MAX_MISMATCHES = 1
    item = agents["partner"].lease(limit=1).json()[0]
    agents["partner"].ack(item["id"], "0" * 64)
    listing = admin_client.get("/admin/routing/delivery/?status__exact=failed").content.decode()
    assert "the receiver&#x27;s copy never matched" in listing and f">{item['id']}<" in listing

    others = list(Delivery.objects.exclude(pk=item["id"]).values_list("pk", flat=True))
    response = admin_client.post(
        "/admin/routing/delivery/", {"action": "retry", "_selected_action": [item["id"], *others]}, follow=True
    )
    assert "1 failed delivery(ies) queued again. 2 selected were not failed" in response.content.decode()
    delivery = Delivery.objects.get(pk=item["id"])
    assert delivery.status == Delivery.Status.QUEUED
    assert (delivery.attempts, delivery.mismatches, delivery.last_error, delivery.failed_at) == (0, 0, "", None)
    retry = AuditEvent.objects.get(action="delivery.retry", object_id=str(item["id"]))
    assert retry.user == admin_user and "never matched" in retry.detail["was"]
    assert item["id"] in [i["id"] for i in agents["partner"].lease(limit=10).json()]


def test_every_state_change_of_a_delivery_is_audited(agents, published, settings, admin_client):
    from centers.models import AuditEvent

    settings.DELIVERY_MAX_MISMATCHES = 2
    [item] = agents["partner"].lease(limit=1).json()
    Delivery.objects.filter(pk=item["id"]).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    deliveries_expire_leases()
    fail_checksum(agents["partner"], 2)
    delivery_id = Delivery.objects.get(status=Delivery.Status.FAILED).pk
    admin_client.post("/admin/routing/delivery/", {"action": "retry", "_selected_action": [delivery_id]})
    actions = list(
        AuditEvent.objects.filter(object_type="delivery", object_id=str(delivery_id))
        .order_by("at", "pk")
        .values_list("action", flat=True)
    )
    assert actions == [
        "delivery.lease",
        "delivery.expire",
        "delivery.lease",
        "delivery.ack_mismatch",
        "delivery.lease",
        "delivery.ack_mismatch",
        "delivery.fail",
        "delivery.retry",
    ]
