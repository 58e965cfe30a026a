import pytest

from tests.dicomfiles import dicom_bytes


@pytest.fixture
def network(db):
    """The cast: our publisher in Shiraz, a partner hospital subscribed to Fars, an outsider in Isfahan."""
    from centers.models import Center, City, Region
    from routing.models import Subscription

    fars = Region.objects.create(slug="fars", name="Fars")
    tehran_region = Region.objects.create(slug="tehran", name="Tehran")
    isfahan_region = Region.objects.create(slug="isfahan", name="Isfahan")
    shiraz = City.objects.create(region=fars, slug="shiraz", name="Shiraz")
    tehran = City.objects.create(region=tehran_region, slug="tehran", name="Tehran")
    isfahan = City.objects.create(region=isfahan_region, slug="isfahan", name="Isfahan")
    own = Center.objects.create(slug="shiraz-imaging", name="Shiraz Imaging", city=shiraz, may_publish=True)
    partner = Center.objects.create(slug="tehran-hospital", name="Tehran Hospital", city=tehran, may_subscribe=True)
    outsider = Center.objects.create(
        slug="isfahan-nuclear", name="Isfahan Nuclear", city=isfahan, may_publish=True, may_subscribe=True
    )
    Subscription.objects.create(center=partner, pattern="fars.#")
    Subscription.objects.create(center=outsider, pattern="#.nm")
    return {"own": own, "partner": partner, "outsider": outsider}


@pytest.fixture
def keys(network):
    from centers.services import apikey_issue

    return {name: apikey_issue(center=center, label="test").secret for name, center in network.items()}


class AgentClient:
    """A Django test client speaking as one center's agent."""

    def __init__(self, client, secret: str, on_commit) -> None:
        self.client = client
        self.auth = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
        self.on_commit = on_commit

    def upload(self, body: bytes, content_type: str = "application/dicom"):
        # The test's transaction never commits, so run the fan-out queued on commit.
        with self.on_commit(execute=True):
            # Set the type by hand: the test client drops it for an empty body.
            return self.client.post(
                "/api/v1/instances", data=body, content_type=content_type, CONTENT_TYPE=content_type, **self.auth
            )

    def lease(self, **params):
        return self.client.get("/api/v1/deliveries", params, **self.auth)

    def file(self, delivery_id: int):
        return self.client.get(f"/api/v1/deliveries/{delivery_id}/file", **self.auth)

    def ack_many(self, acks: list[tuple[int, str]]):
        return self.client.post(
            "/api/v1/deliveries/ack",
            data={"acks": [{"id": pk, "sha256": sha} for pk, sha in acks]},
            content_type="application/json",
            **self.auth,
        )

    def ack(self, delivery_id: int, sha256: str):
        return self.client.post(
            f"/api/v1/deliveries/{delivery_id}/ack",
            data={"sha256": sha256},
            content_type="application/json",
            **self.auth,
        )


@pytest.fixture
def agents(client, keys, storage_dir, django_capture_on_commit_callbacks):
    return {name: AgentClient(client, secret, django_capture_on_commit_callbacks) for name, secret in keys.items()}


@pytest.fixture
def storage_dir(settings, tmp_path):
    """Each test stores DICOM bytes in its own folder."""
    location = tmp_path / "storage"
    settings.STORAGES = {
        **settings.STORAGES,
        "dicom": {"BACKEND": "portal.storage.DurableFileSystemStorage", "OPTIONS": {"location": str(location)}},
    }
    return location


@pytest.fixture
def ct_file():
    return dicom_bytes("CT")
