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
    elif isinstance(data, dict):
        message = "; ".join(
            f"{field}: {' '.join(map(str, errors)) if isinstance(errors, list) else errors}"
            for field, errors in data.items()
        )
    else:
        message = " ".join(map(str, data)) if isinstance(data, list) else str(data)
    response.data = {"error": message}
    return response
