import sys

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.http import HttpResponse, HttpResponseServerError, JsonResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from django.views.defaults import page_not_found as django_page_not_found
from django.views.defaults import server_error as django_server_error

from routing.services import StoredFileMissing

# How long a client is asked to wait when the database is unreachable: PostgreSQL
# restarts in seconds, and the pool replaces its connections as soon as it is back.
DATABASE_RETRY_AFTER_SECONDS = 5


@require_GET
def health(request):
    """Liveness and database reachability, for load balancers and monitoring."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        database = "ok"
    except Exception as exc:  # the point is to report any failure, not to crash
        database = f"error: {exc.__class__.__name__}"
    status = 200 if database == "ok" else 503
    return JsonResponse({"status": "ok" if status == 200 else "degraded", "database": database}, status=status)


def server_error(request) -> HttpResponseServerError | JsonResponse:
    """Django's 500 page, except for a database that is unreachable (503, to retry) and a
    stored file that is gone (410).

    Django calls this while it handles the exception, wherever it was raised (a view,
    a middleware, REST framework), so a restarting PostgreSQL or an exhausted pool
    answers agents with something they retry, never a 500.
    """
    exception = sys.exception()
    if isinstance(exception, StoredFileMissing):
        # The row outlived its file: a lost disk or a hand-made removal. Nothing the
        # client can retry will bring it back, and the error log names the instance.
        message = f"{exception} The portal's administrator has to restore it from a backup or the sender."
        if request.path.startswith(("/api/", "/dicomweb/")):
            return JsonResponse({"error": message}, status=410)
        return HttpResponse(message, status=410, content_type="text/plain; charset=utf-8")
    if isinstance(exception, OperationalError | InterfaceError):
        response = JsonResponse(
            {"error": "The portal's database is unavailable for a moment; try again shortly."}, status=503
        )
        response["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
        return response
    return django_server_error(request)


def not_found(request, exception) -> HttpResponse:
    """Django's 404 page, except under /api/: there a path no route matches (a delivery id
    that is not a number) answers the API's {"error": ...} body, like every other API error."""
    if request.path.startswith("/api/"):
        return JsonResponse({"error": f"Nothing is at {request.path} in this API."}, status=404)
    return django_page_not_found(request, exception)


def login_locked_out(request, credentials, *args, **kwargs) -> HttpResponse:
    """django-axes' answer to a login while locked out: a page that says why and for how long."""
    minutes = max(1, round(settings.AXES_COOLOFF_TIME.total_seconds() / 60))
    response = render(
        request,
        "registration/locked_out.html",
        {"failure_limit": settings.AXES_FAILURE_LIMIT, "minutes": minutes},
        status=429,
    )
    response["Retry-After"] = str(int(settings.AXES_COOLOFF_TIME.total_seconds()))
    return response
