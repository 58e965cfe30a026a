"""A center's webhook: a signed POST once a study is complete for it, retried with backoff, failures visible."""

import time
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone
from pydicom.uid import generate_uid

from centers.models import Center, Membership
from centers.services import webhook_secret_renew
from centers.webhooks import webhook_secret
from routing import tasks
from routing.models import Instance, StudyWebhook, Subscription
from routing.webhooks import study_webhooks_retry
from tests.integration.stack import wait_for
from tests.routing.wholestudy import age, make_copy, publish, study_with_copies
from tests.webhookserver import WebhookServer

pytestmark = pytest.mark.django_db


@pytest.fixture
def whole(network, settings):
    settings.STUDY_STABLE_SECONDS = 60
    settings.WEBHOOK_RETRY_SECONDS = 0.2
    settings.WEBHOOK_TIMEOUT_SECONDS = 5
    Subscription.objects.filter(center=network["partner"]).update(deliver=Subscription.Deliver.STUDY)
    return network


def stable(study_uid: str) -> None:
    Instance.objects.filter(series__study__study_instance_uid=study_uid).update(
        received_at=timezone.now() - timedelta(seconds=61)
    )


def receive_all(agents) -> int:
    items = agents["partner"].lease(limit=100).json()
    if items:
        assert agents["partner"].ack_many([(i["id"], i["sha256"]) for i in items]).status_code == 200
    return len(items)


def hook_to(center: Center, url: str) -> None:
    Center.objects.filter(pk=center.pk).update(webhook_url=url)
    center.refresh_from_db()


def run_periodic_until(condition, what: str):
    """What beat does every SWEEP_INTERVAL_SECONDS, until the condition holds."""

    def step():
        tasks.study_webhooks()
        return condition()

    return wait_for(step, timeout=30, interval=0.1, what=what)


def test_a_complete_study_is_posted_once_signed_with_the_centers_secret(agents, whole):
    study = generate_uid()
    publish(agents, study, 3)
    with WebhookServer() as server:
        hook_to(whole["partner"], server.url)
        stable(study)
        assert receive_all(agents) == 3

        tasks.study_webhooks()
        tasks.study_webhooks()

        [received] = server.received
    body = received.json()
    assert body["event"] == "study.complete"
    assert body["center"] == whole["partner"].slug
    assert body["study_instance_uid"] == study
    assert body["instances"] == 3
    assert received.verifies(webhook_secret(whole["partner"]))
    assert not received.verifies(webhook_secret(whole["outsider"]))
    assert abs(int(received.headers["x-exchange-timestamp"]) - time.time()) < 60
    hook = StudyWebhook.objects.get()
    assert (hook.status, hook.attempts, hook.last_error) == (StudyWebhook.Status.SENT, 1, "")


def test_nothing_is_posted_before_the_study_is_stable_and_wholly_delivered(agents, whole):
    study = generate_uid()
    publish(agents, study, 3)
    with WebhookServer() as server:
        hook_to(whole["partner"], server.url)
        # Delivered but not stable: only an instance-by-instance center can be here.
        Subscription.objects.filter(center=whole["partner"]).update(deliver=Subscription.Deliver.INSTANCE)
        publish(agents, study, 1, first=4)
        items = agents["partner"].lease(limit=100).json()
        assert len(items) == 1
        agents["partner"].ack_many([(i["id"], i["sha256"]) for i in items])
        tasks.study_webhooks()
        assert server.received == []

        stable(study)
        items = agents["partner"].lease(limit=2).json()
        agents["partner"].ack_many([(i["id"], i["sha256"]) for i in items[:2]])
        tasks.study_webhooks()
        assert server.received == []  # one of the study's deliveries is still out


def test_a_failed_post_is_retried_with_backoff_until_it_succeeds(agents, whole):
    study = generate_uid()
    publish(agents, study, 2)
    with WebhookServer(statuses=[500, 200]) as server:
        hook_to(whole["partner"], server.url)
        stable(study)
        receive_all(agents)

        tasks.study_webhooks()
        hook = StudyWebhook.objects.get()
        assert (hook.status, hook.attempts) == (StudyWebhook.Status.PENDING, 1)
        assert "500" in hook.last_error
        assert hook.next_attempt_at > timezone.now()
        run_periodic_until(
            lambda: StudyWebhook.objects.filter(status=StudyWebhook.Status.SENT).exists(), "the retried webhook"
        )

    assert len(server.received) == 2
    assert all(r.verifies(webhook_secret(whole["partner"])) for r in server.received)
    hook.refresh_from_db()
    assert (hook.attempts, hook.last_error) == (2, "")


def test_it_gives_up_after_the_last_attempt_shows_it_and_an_administrator_can_retry(agents, whole, settings):
    settings.WEBHOOK_MAX_ATTEMPTS = 3
    study = generate_uid()
    publish(agents, study, 1)
    with WebhookServer(statuses=[503]) as server:
        hook_to(whole["partner"], server.url)
        stable(study)
        receive_all(agents)
        run_periodic_until(
            lambda: StudyWebhook.objects.filter(status=StudyWebhook.Status.FAILED).exists(), "the webhook to fail"
        )
        assert len(server.received) == 3
        hook = StudyWebhook.objects.get()
        assert hook.attempts == 3 and hook.next_attempt_at is None

        user = User.objects.create_user("it-partner")
        Membership.objects.create(user=user, center=whole["partner"])
        browser = Client()
        browser.force_login(user)
        page = browser.get("/dashboard/").content.decode()
        assert 'id="webhook-failures"' in page
        assert "1 webhook failed for good" in page and "503" in page

        server.statuses = [200]
        assert study_webhooks_retry(webhooks=StudyWebhook.objects.all()) == 1
        run_periodic_until(lambda: StudyWebhook.objects.filter(status=StudyWebhook.Status.SENT).exists(), "a resend")
    assert 'id="webhook-failures"' not in browser.get("/dashboard/").content.decode()


def test_a_redirect_is_not_followed(agents, whole):
    study = generate_uid()
    publish(agents, study, 1)
    with WebhookServer() as elsewhere, WebhookServer(statuses=[302], location="") as server:
        server.location = elsewhere.url
        hook_to(whole["partner"], server.url)
        stable(study)
        receive_all(agents)
        tasks.study_webhooks()
    assert len(server.received) == 1 and elsewhere.received == []
    assert "redirects are not followed" in StudyWebhook.objects.get().last_error


def test_a_later_instance_completes_the_study_again_with_the_new_count(agents, whole):
    study = generate_uid()
    publish(agents, study, 2)
    with WebhookServer() as server:
        hook_to(whole["partner"], server.url)
        stable(study)
        receive_all(agents)
        tasks.study_webhooks()
        publish(agents, study, 1, first=3)
        stable(study)
        assert receive_all(agents) == 1
        tasks.study_webhooks()
    assert [r.json()["instances"] for r in server.received] == [2, 3]


@pytest.mark.parametrize("url", ["ftp://example.org/hook", "file:///etc/passwd", "javascript:alert(1)"])
def test_only_http_and_https_urls_are_accepted(network, url):
    center = network["partner"]
    center.webhook_url = url
    with pytest.raises(ValidationError):
        center.full_clean()


def test_a_new_secret_no_longer_verifies_the_old_signature(network):
    before = webhook_secret(network["partner"])
    webhook_secret_renew(centers=Center.objects.filter(pk=network["partner"].pk))
    network["partner"].refresh_from_db()
    assert webhook_secret(network["partner"]) != before
    assert before not in str(Center.objects.filter(pk=network["partner"].pk).values().get())


@pytest.fixture
def copies(agents, whole):
    return study_with_copies(agents, whole)


def test_a_de_identifying_center_hears_of_the_copy_study_once_every_copy_is_delivered(agents, network, copies):
    first, second = copies["originals"]
    partner = network["partner"]
    with WebhookServer() as server:
        hook_to(partner, server.url)
        make_copy(first, partner, copies["series"], whole_study=False)
        age(copies["study"], 120)
        age(copies["copy_study"].study_instance_uid, 120)
        assert receive_all(agents) == 1
        tasks.study_webhooks()
        assert server.received == []  # the second copy is still to be made

        make_copy(second, partner, copies["series"], whole_study=False)
        age(copies["copy_study"].study_instance_uid, 120)
        assert receive_all(agents) == 1
        tasks.study_webhooks()

        [received] = server.received
    body = received.json()
    assert body["study_instance_uid"] == copies["copy_study"].study_instance_uid
    assert body["instances"] == 2
    assert copies["study"] not in received.body.decode()
    assert "PAT-001" not in received.body.decode() and "Doe" not in received.body.decode()


def test_an_administrator_edits_the_url_and_reads_the_secret_on_the_centers_admin_page(network, admin_client):
    center = network["partner"]
    page = admin_client.get(f"/admin/centers/center/{center.pk}/change/").content.decode()

    assert 'name="webhook_url"' in page
    assert webhook_secret(center) in page
