"""Project-wide REST framework glue."""

from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc, context):
    """Answer every API error as {"error": "<sentence>"}, the contract agents rely on."""
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    if isinstance(data, dict) and "detail" in data:
        message = str(data["detail"])
    else:
        message = "; ".join(error_lines(data))
    response.data = {"error": message}
    return response


def error_lines(errors, path: str = "") -> list[str]:
    """REST framework's nested validation errors (dicts by field or list index, lists of
    messages) as "acks.3.sha256: must be 64 hexadecimal digits." lines."""
    if isinstance(errors, dict):
        lines = []
        for key, nested in errors.items():
            name = "" if key == "non_field_errors" else str(key)
            lines += error_lines(nested, f"{path}.{name}" if path and name else path or name)
        return lines
    if isinstance(errors, list):
        if all(not isinstance(item, dict | list) for item in errors):
            text = " ".join(str(item) for item in errors)
            return [f"{path}: {text}" if path else text] if text else []
        lines = []
        for index, nested in enumerate(errors):
            if nested:
                lines += error_lines(nested, f"{path}.{index}" if path else str(index))
        return lines
    return [f"{path}: {errors}" if path else str(errors)]
