"""An expensive report (cacheable) and a per-user page (never cached)."""
import time

from django.http import HttpResponse, StreamingHttpResponse


def report(request, name):
    """1 s before the first byte, then a generated body; cacheable for a day."""
    size = min(int(request.GET.get("size", 8 << 20)), 1 << 30)

    def generate():
        time.sleep(1.0)  # the expensive part the cache saves
        line = f"{name} report line\n".encode()
        block = line * (65536 // len(line))
        left = size
        while left > 0:
            piece = block[:left]
            left -= len(piece)
            yield piece

    response = StreamingHttpResponse(generate(), content_type="text/plain")
    response["Content-Length"] = str(size)
    response["Cache-Control"] = "public, max-age=86400"
    return response


def whoami(request):
    """Sets a cookie: CacheFetch never stores it."""
    response = HttpResponse(f"you are visitor {time.monotonic_ns()}\n", content_type="text/plain")
    response.set_cookie("visitor", str(time.monotonic_ns()))
    return response
