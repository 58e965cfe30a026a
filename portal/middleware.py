from collections.abc import AsyncIterator, Iterable

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest

_END = object()


async def _pulled_in_thread(iterator: Iterable[bytes]) -> AsyncIterator[bytes]:
    # thread_sensitive: the chunks are produced in the request's own thread,
    # where the view ran, so generators that touch the database keep its connection.
    pull = sync_to_async(next, thread_sensitive=True)
    chunks = iter(iterator)
    while (chunk := await pull(chunks, _END)) is not _END:
        yield chunk


class AsyncStreamingMiddleware:
    """Keep streamed responses streamed under ASGI.

    Django's ASGI handler reads a synchronous streaming body (a FileResponse,
    a generator) whole into memory before sending a byte. A 500 MB instance
    would cost 500 MB per download; pulling one chunk at a time from a thread
    keeps memory flat whatever the file size.
    """

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if isinstance(request, ASGIRequest) and response.streaming and not response.is_async:
            response.streaming_content = _pulled_in_thread(response.streaming_content)
        return response
