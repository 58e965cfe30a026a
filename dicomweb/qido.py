"""QIDO-RS: query parameters into ORM filters, and matched rows into dicom+json.

Keys come as keywords (PatientID) or 8-digit tags (00100020), as OHIF sends
them. Matching follows PS3.4 C.2.2.2: single values, UID lists, `*`/`?`
wildcards, date ranges; an empty value asks for the attribute without
filtering on it. Everything the database indexes is answered from it; other
attributes asked for with includefield come from the header of one instance.
"""

import re
from dataclasses import dataclass, field
from datetime import date

from django.db.models import Count, Exists, OuterRef, Q, QuerySet
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from centers.models import Center
from dicomweb import selectors
from dicomweb.metadata import dataset_json, instance_header
from routing.models import Instance, Series, Study

RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}
MAX_LIMIT = 10000
STUDY, SERIES, INSTANCE = "study", "series", "instance"
_PREFIX = {
    STUDY: {STUDY: ""},
    SERIES: {STUDY: "study__", SERIES: ""},
    INSTANCE: {STUDY: "series__study__", SERIES: "series__", INSTANCE: ""},
}


class QueryError(ValueError):
    """A query the server cannot understand: answered 400."""


@dataclass(frozen=True)
class Key:
    level: str
    path: str
    kind: str  # uid | text | name | date | int | modality


# What can be matched, where it lives (relative to the model of its level), and how.
KEYS: dict[int, Key] = {
    0x00100020: Key(STUDY, "patient__patient_id", "text"),
    0x00100010: Key(STUDY, "patient__name", "name"),
    0x00100030: Key(STUDY, "patient__birth_date", "date"),
    0x00100040: Key(STUDY, "patient__sex", "text"),
    0x0020000D: Key(STUDY, "study_instance_uid", "uid"),
    0x00080020: Key(STUDY, "study_date", "date"),
    0x00080050: Key(STUDY, "accession_number", "text"),
    0x00081030: Key(STUDY, "description", "text"),
    0x00080061: Key(STUDY, "", "modalities"),
    0x00080060: Key(SERIES, "modality", "modality"),
    0x0020000E: Key(SERIES, "series_instance_uid", "uid"),
    0x00200011: Key(SERIES, "series_number", "int"),
    0x0008103E: Key(SERIES, "description", "text"),
    0x00180015: Key(SERIES, "body_part", "text"),
    0x00080018: Key(INSTANCE, "sop_instance_uid", "uid"),
    0x00080016: Key(INSTANCE, "sop_class_uid", "uid"),
    0x00200013: Key(INSTANCE, "instance_number", "int"),
}

# The attributes PS3.18 (table 6.7.1-2) lists per level, plus what viewers show.
DEFAULTS = {
    STUDY: [
        0x00080005,
        0x00080020,
        0x00080030,
        0x00080050,
        0x00080056,
        0x00080061,
        0x00080090,
        0x00081030,
        0x00081190,
        0x00100010,
        0x00100020,
        0x00100030,
        0x00100040,
        0x0020000D,
        0x00200010,
        0x00201206,
        0x00201208,
    ],  # fmt: skip
    SERIES: [
        0x00080005,
        0x00080060,
        0x0008103E,
        0x00081190,
        0x0020000D,
        0x0020000E,
        0x00200011,
        0x00201209,
        0x00400244,
        0x00400245,
    ],  # fmt: skip
    INSTANCE: [
        0x00080005,
        0x00080016,
        0x00080018,
        0x00080056,
        0x00081190,
        0x0020000D,
        0x0020000E,
        0x00200013,
        0x00280008,
        0x00280010,
        0x00280011,
        0x00280100,
    ],  # fmt: skip
}
# Header attributes that describe one instance: never copied up to a study or series row.
_INSTANCE_ONLY = {0x00080016, 0x00080018, 0x00200013, 0x00080008, 0x00200032, 0x00200037, 0x00201041}


def tag_of(name: str) -> int:
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise QueryError(f"{name!r} is neither a DICOM keyword nor an 8-digit tag.")
    return tag


@dataclass
class Query:
    level: str
    filters: list[tuple[int, str]] = field(default_factory=list)
    include: set[int] = field(default_factory=set)
    include_all: bool = False
    fuzzy: bool = False
    limit: int | None = None
    offset: int = 0
    ignored: list[str] = field(default_factory=list)


def _whole(value: str, name: str) -> int:
    if not value.isdigit():
        raise QueryError(f"'{name}' must be a whole number, not {value!r}.")
    return int(value)


def query_parse(params, *, level: str) -> Query:
    query = Query(level=level)
    for name in params:
        values = params.getlist(name)
        lowered = name.lower()
        if lowered == "limit":
            query.limit = min(_whole(values[-1], name), MAX_LIMIT)
        elif lowered == "offset":
            query.offset = _whole(values[-1], name)
        elif lowered == "fuzzymatching":
            query.fuzzy = values[-1].strip().lower() == "true"
        elif lowered == "includefield":
            for value in values:
                for item in filter(None, (v.strip() for v in value.split(","))):
                    if item.lower() == "all":
                        query.include_all = True
                    else:
                        query.include.add(tag_of(item))
        else:
            tag = tag_of(name)
            query.include.add(tag)
            value = ",".join(v for v in values if v)
            if value:
                query.filters.append((tag, value))
    return query


def _wildcard_regex(value: str) -> str:
    return "^" + "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in value) + "$"


def _date(text: str) -> date:
    digits = text.strip().replace("-", "").replace(".", "")
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except (ValueError, IndexError):
        raise QueryError(f"{text!r} is not a date (YYYYMMDD).") from None


def _list(value: str) -> list[str]:
    return [item.strip() for item in re.split(r"[,\\]", value) if item.strip()]


def _match(tag: int, key: Key, value: str, *, fuzzy: bool, center: Center, prefix: str) -> Q:
    path = prefix + key.path
    if key.kind == "uid":
        return Q(**{f"{path}__in": _list(value)})
    if key.kind == "modality":
        return Q(**{f"{path}__in": [v.upper() for v in _list(value)]})
    if key.kind == "int":
        return Q(**{f"{path}__in": [_whole(v, keyword_for_tag(tag)) for v in _list(value)]})
    if key.kind == "date":
        if "-" in value.strip("-") or value.startswith("-") or value.endswith("-"):
            start, _, end = value.partition("-")
            q = Q()
            if start.strip():
                q &= Q(**{f"{path}__gte": _date(start)})
            if end.strip():
                q &= Q(**{f"{path}__lte": _date(end)})
            return q
        return Q(**{path: _date(value)})
    if key.kind == "modalities":
        wanted = [v.upper() for v in _list(value)]
        visible = selectors.instances_visible(center=center).filter(
            series__study=OuterRef(f"{prefix}pk" if prefix else "pk"), series__modality__in=wanted
        )
        return Q(Exists(visible))
    name = key.kind == "name"
    if "*" in value or "?" in value:
        return Q(**{f"{path}__{'iregex' if name else 'regex'}": _wildcard_regex(value)})
    if name and fuzzy:
        # Fuzzy: any component of the name starting with the value (PS3.18 leaves the method open).
        return Q(**{f"{path}__iregex": r"(^|[\^= ])" + re.escape(value)})
    return Q(**{f"{path}__{'iexact' if name else 'exact'}": value})


_ORDER = {
    STUDY: ["-study_date", "-pk"],
    SERIES: ["study_id", "series_number", "pk"],
    INSTANCE: ["series_id", "instance_number", "pk"],
}
_LEVELS = [STUDY, SERIES, INSTANCE]


def query_run(query: Query, *, center: Center, study_uid: str | None = None, series_uid: str | None = None) -> QuerySet:
    """The visible rows of the query's level that match, ordered, limited."""
    level = query.level
    if level == STUDY:
        rows = selectors.studies_visible(center=center).select_related("patient")
    elif level == SERIES:
        rows = selectors.series_visible(center=center).select_related("study__patient")
        if study_uid:
            rows = rows.filter(study__study_instance_uid=study_uid)
    else:
        rows = selectors.instances_visible(center=center).select_related("series__study__patient")
        if study_uid:
            rows = rows.filter(series__study__study_instance_uid=study_uid)
        if series_uid:
            rows = rows.filter(series__series_instance_uid=series_uid)
    for tag, value in query.filters:
        key = KEYS.get(tag)
        if key is not None and level == STUDY and key.kind == "modality":
            # Modality asked of studies means the modalities in them.
            key = KEYS[0x00080061]
        if key is None or _LEVELS.index(key.level) > _LEVELS.index(level):
            query.ignored.append(keyword_for_tag(tag) or f"{tag:08X}")
            continue
        rows = rows.filter(_match(tag, key, value, fuzzy=query.fuzzy, center=center, prefix=_PREFIX[level][key.level]))
    rows = rows.order_by(*_ORDER[level])
    end = query.offset + query.limit if query.limit is not None else None
    return rows[query.offset : end]


# -- rows into dicom+json ---------------------------------------------------------


def _element(tag: int, value) -> dict:
    vr = dictionary_VR(tag)
    if value is None or value == "" or value == []:
        return {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        values = [{"Alphabetic": v} for v in values]
    elif vr == "DA":
        values = [v.strftime("%Y%m%d") if isinstance(v, date) else v for v in values]
    return {"vr": vr, "Value": values}


def _study_values(study: Study, counts: dict, base: str) -> dict[int, object]:
    patient = study.patient
    return {
        0x00080005: "ISO_IR 192",
        0x00080020: study.study_date,
        0x00080030: study.study_time,
        0x00080050: study.accession_number,
        0x00080056: "ONLINE",
        0x00080061: sorted(counts.get("modalities", [])),
        0x00080090: None,
        0x00081030: study.description,
        0x00081190: f"{base}/studies/{study.study_instance_uid}",
        0x00100010: patient.name,
        0x00100020: patient.patient_id,
        0x00100030: patient.birth_date,
        0x00100040: patient.sex,
        0x0020000D: study.study_instance_uid,
        0x00200010: None,
        0x00201206: counts.get("series", 0),
        0x00201208: counts.get("instances", 0),
    }


def _series_values(series: Series, count: int, base: str) -> dict[int, object]:
    study_uid = series.study.study_instance_uid
    return {
        0x00080005: "ISO_IR 192",
        0x00080060: series.modality,
        0x0008103E: series.description,
        0x00081190: f"{base}/studies/{study_uid}/series/{series.series_instance_uid}",
        0x00180015: series.body_part,
        0x0020000D: study_uid,
        0x0020000E: series.series_instance_uid,
        0x00200011: series.series_number,
        0x00201209: count,
        0x00400244: None,
        0x00400245: None,
    }


def _instance_values(instance: Instance, base: str) -> dict[int, object]:
    series = instance.series
    study_uid = series.study.study_instance_uid
    url = f"{base}/studies/{study_uid}/series/{series.series_instance_uid}/instances/{instance.sop_instance_uid}"
    return {
        0x00080005: "ISO_IR 192",
        0x00080016: instance.sop_class_uid,
        0x00080018: instance.sop_instance_uid,
        0x00080056: "ONLINE",
        0x00081190: url,
        0x0020000D: study_uid,
        0x0020000E: series.series_instance_uid,
        0x00200013: instance.instance_number,
    }


def _instance_url(instance: Instance, base: str) -> str:
    series = instance.series
    return (
        f"{base}/studies/{series.study.study_instance_uid}/series/{series.series_instance_uid}"
        f"/instances/{instance.sop_instance_uid}"
    )


def _document(values: dict[int, object], wanted: set[int]) -> dict:
    return {f"{tag:08X}": _element(tag, values[tag]) for tag in sorted(wanted) if tag in values}


def _levels_shown(query: Query, *, study_uid: str | None, series_uid: str | None) -> list[str]:
    # Searching across studies returns the study attributes of each hit (PS3.18 6.7.1.2.2).
    if query.level == STUDY:
        return [STUDY]
    if query.level == SERIES:
        return [SERIES] if study_uid else [STUDY, SERIES]
    shown = [INSTANCE]
    if not series_uid:
        shown.insert(0, SERIES)
    if not study_uid:
        shown.insert(0, STUDY)
    return shown


def results_json(
    query: Query, rows, *, center: Center, base: str, study_uid: str | None = None, series_uid: str | None = None
) -> list[dict]:
    rows = list(rows)
    if not rows:
        return []
    shown = _levels_shown(query, study_uid=study_uid, series_uid=series_uid)
    wanted = set(query.include)
    for level in shown:
        wanted |= set(DEFAULTS[level])
    studies = {_study_of(row, query.level).pk: _study_of(row, query.level) for row in rows}
    study_counts = _study_counts(center, list(studies)) if STUDY in shown else {}
    series_counts = _series_counts(center, [_series_of(row, query.level).pk for row in rows]) if SERIES in shown else {}
    documents = []
    for row in rows:
        values: dict[int, object] = {}
        study = _study_of(row, query.level)
        values.update(_study_values(study, study_counts.get(study.pk, {}), base))
        if query.level in (SERIES, INSTANCE):
            series = _series_of(row, query.level)
            values.update(_series_values(series, series_counts.get(series.pk, 0), base))
        if query.level == INSTANCE:
            values.update(_instance_values(row, base))
        document = _document(values, wanted)
        missing = {tag for tag in wanted if f"{tag:08X}" not in document and not _below(tag, query.level)}
        if missing or query.include_all or query.level == INSTANCE:
            document = _with_header(document, row, query, missing, base=base, center=center)
        documents.append(dict(sorted(document.items())))
    return documents


def _below(tag: int, level: str) -> bool:
    """An attribute of a lower level (Modality asked of studies): no header can answer it for the row."""
    key = KEYS.get(tag)
    return key is not None and _LEVELS.index(key.level) > _LEVELS.index(level)


def _with_header(document: dict, row, query: Query, missing: set[int], *, base: str, center: Center) -> dict:
    """Fill what the database does not hold from the header of one (visible) instance of the row."""
    instance = row if query.level == INSTANCE else _representative(row, query.level, center)
    if instance is None:
        return document
    header = dataset_json(instance_header(instance), instance_url=_instance_url(instance, base))
    for key, element in header.items():
        tag = int(key, 16)
        if key in document or (query.level != INSTANCE and tag in _INSTANCE_ONLY):
            continue
        if query.include_all or tag in missing:
            document[key] = element
    return document


def _representative(row, level: str, center: Center) -> Instance | None:
    instances = selectors.instances_visible(center=center).select_related("series__study")
    if level == STUDY:
        instances = instances.filter(series__study=row)
    else:
        instances = instances.filter(series=row)
    return instances.order_by("series_id", "instance_number", "pk").first()


def _study_of(row, level: str) -> Study:
    return row if level == STUDY else row.study if level == SERIES else row.series.study


def _series_of(row, level: str) -> Series:
    return row if level == SERIES else row.series


def _study_counts(center: Center, study_ids: list[int]) -> dict[int, dict]:
    counts: dict[int, dict] = {}
    grouped = (
        selectors.instances_visible(center=center)
        .filter(series__study_id__in=study_ids)
        .values("series__study_id", "series__modality")
        .annotate(instances=Count("pk"), series=Count("series_id", distinct=True))
        .order_by()
    )
    for item in grouped:
        entry = counts.setdefault(item["series__study_id"], {"modalities": set(), "series": 0, "instances": 0})
        entry["modalities"].add(item["series__modality"])
        entry["series"] += item["series"]
        entry["instances"] += item["instances"]
    return counts


def _series_counts(center: Center, series_ids: list[int]) -> dict[int, int]:
    grouped = (
        selectors.instances_visible(center=center)
        .filter(series_id__in=series_ids)
        .values("series_id")
        .annotate(instances=Count("pk"))
        .order_by()
    )
    return {item["series_id"]: item["instances"] for item in grouped}
