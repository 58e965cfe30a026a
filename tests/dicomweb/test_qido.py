import pytest

from tests.dicomfiles import dicom_bytes
from tests.dicomweb.conftest import values

STUDY_A = "1.2.826.0.1.3680043.8.498.3001"
STUDY_B = "1.2.826.0.1.3680043.8.498.3002"
SERIES_A1 = "1.2.826.0.1.3680043.8.498.3001.1"
SERIES_A2 = "1.2.826.0.1.3680043.8.498.3001.2"


@pytest.fixture
def two_studies(web):
    """Jane's CT+MR study of March 2024, and John's CT study of January 2023, published by our center."""
    files = [
        dicom_bytes(
            "CT",
            study_uid=STUDY_A,
            series_uid=SERIES_A1,
            instance_number=n,
            patient_id="PAT-A",
            patient_name="Doe^Jane",
            StudyDate="20240315",
            AccessionNumber="ACC-1",
            StudyDescription="Chest CT",
        )
        for n in (1, 2)
    ]
    files.append(
        dicom_bytes(
            "MR",
            study_uid=STUDY_A,
            series_uid=SERIES_A2,
            patient_id="PAT-A",
            patient_name="Doe^Jane",
            StudyDate="20240315",
            AccessionNumber="ACC-1",
        )
    )
    files.append(
        dicom_bytes(
            "CT",
            study_uid=STUDY_B,
            patient_id="PAT-B",
            patient_name="Roe^John",
            StudyDate="20230110",
            AccessionNumber="ACC-2",
        )
    )
    assert web["own"].stow(*files).status_code == 200
    return web["own"]


def study_uids(documents):
    return sorted(values(d, "0020000D")[0] for d in documents)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, [STUDY_A, STUDY_B]),
        ({"PatientID": "PAT-A"}, [STUDY_A]),
        ({"00100020": "PAT-B"}, [STUDY_B]),
        ({"PatientName": "doe*"}, [STUDY_A]),
        ({"PatientName": "R?E^JOHN"}, [STUDY_B]),
        ({"PatientName": "*o*"}, [STUDY_A, STUDY_B]),
        ({"PatientName": "jane", "fuzzymatching": "true"}, [STUDY_A]),
        ({"PatientName": "jane"}, []),
        ({"StudyDate": "20240315"}, [STUDY_A]),
        ({"StudyDate": "20230101-20231231"}, [STUDY_B]),
        ({"StudyDate": "20240101-"}, [STUDY_A]),
        ({"StudyDate": "-20231231"}, [STUDY_B]),
        ({"StudyInstanceUID": f"{STUDY_A},{STUDY_B}"}, [STUDY_A, STUDY_B]),
        ({"0020000D": STUDY_B}, [STUDY_B]),
        ({"AccessionNumber": "ACC-1"}, [STUDY_A]),
        ({"ModalitiesInStudy": "MR"}, [STUDY_A]),
        ({"00080061": "CT"}, [STUDY_A, STUDY_B]),
        ({"ModalitiesInStudy": "US"}, []),
    ],
)
def test_it_matches_studies_on_the_usual_keys(two_studies, params, expected):
    assert study_uids(two_studies.search("/dicomweb/studies", **params)) == expected


def test_it_answers_the_default_study_attributes_with_counts_and_a_public_retrieve_url(two_studies, settings):
    settings.PORTAL_PUBLIC_URL = "https://exchange.example.org"
    (study,) = two_studies.search("/dicomweb/studies", StudyInstanceUID=STUDY_A)
    assert values(study, "00100010") == [{"Alphabetic": "Doe^Jane"}]
    assert values(study, "00080020") == ["20240315"]
    assert values(study, "00080061") == ["CT", "MR"]
    assert values(study, "00201206") == [2]
    assert values(study, "00201208") == [3]
    assert values(study, "00081190") == [f"https://exchange.example.org/dicomweb/studies/{STUDY_A}"]
    assert study["00100020"]["vr"] == "LO"


def test_it_pages_with_limit_and_offset(two_studies):
    first = two_studies.search("/dicomweb/studies", limit="1")
    second = two_studies.search("/dicomweb/studies", limit="1", offset="1")
    assert len(first) == len(second) == 1
    assert study_uids(first + second) == [STUDY_A, STUDY_B]


def test_it_adds_included_fields_by_tag_keyword_or_all(two_studies):
    (study,) = two_studies.search("/dicomweb/studies", PatientID="PAT-A", includefield="00081030,PatientSex")
    assert values(study, "00081030") == ["Chest CT"]
    (series,) = two_studies.search(f"/dicomweb/studies/{STUDY_A}/series", Modality="CT", includefield="all")
    # From the header: not indexed by the portal, still answered.
    assert series["00180050"]["vr"] == "DS"
    assert "00080018" not in series


def test_it_searches_series_and_instances_at_every_level(two_studies):
    series = two_studies.search(f"/dicomweb/studies/{STUDY_A}/series")
    assert sorted(values(s, "0020000E")[0] for s in series) == [SERIES_A1, SERIES_A2]
    assert values(two_studies.search(f"/dicomweb/studies/{STUDY_A}/series", Modality="MR")[0], "0020000E") == [
        SERIES_A2
    ]
    across = two_studies.search("/dicomweb/series", Modality="CT")
    assert sorted(values(s, "0020000D")[0] for s in across) == [STUDY_A, STUDY_B]
    # Searching across studies answers each series' study attributes too.
    assert all("00100020" in s for s in across)
    instances = two_studies.search(f"/dicomweb/studies/{STUDY_A}/series/{SERIES_A1}/instances")
    assert [values(i, "00200013") for i in instances] == [[1], [2]]
    assert values(instances[0], "00280010") == [128]
    sop = values(instances[1], "00080018")[0]
    assert len(two_studies.search("/dicomweb/instances", SOPInstanceUID=sop)) == 1
    assert len(two_studies.search(f"/dicomweb/studies/{STUDY_A}/instances", Modality="CT")) == 2
    assert two_studies.search("/dicomweb/instances", SeriesInstanceUID=SERIES_A2, PatientID="PAT-A")[0]["00080060"] == {
        "vr": "CS",
        "Value": ["MR"],
    }


def test_no_match_is_200_with_an_empty_list(two_studies):
    assert two_studies.search("/dicomweb/studies", PatientID="NOBODY") == []
    assert two_studies.search("/dicomweb/studies/1.2.3/series") == []


@pytest.mark.parametrize(
    "params", [{"NotAKeyword": "x"}, {"StudyDate": "yesterday"}, {"limit": "-1"}, {"includefield": "Bogus"}]
)
def test_it_answers_400_for_a_query_it_cannot_understand(two_studies, params):
    response = two_studies.get("/dicomweb/studies", **params)
    assert response.status_code == 400
    assert response["Warning"].startswith("299")
