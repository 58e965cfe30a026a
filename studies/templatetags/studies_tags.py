from django import template

register = template.Library()


@register.filter
def person_name(value: str) -> str:
    """A DICOM PN (Family^Given^Middle^Prefix^Suffix) as people write it: "Doe, Jane"."""
    parts = [part.strip() for part in str(value or "").split("^")]
    family, given = (parts + ["", ""])[:2]
    rest = " ".join(p for p in parts[2:] if p)
    name = ", ".join(p for p in [family, " ".join(p for p in [given, rest] if p)] if p)
    return name or "(no name)"


@register.filter
def megabytes(value: int) -> str:
    return f"{(value or 0) / 1024 / 1024:.1f} MB"
