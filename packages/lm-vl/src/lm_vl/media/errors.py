"""`MediaError`: the one error media loading raises, shaped so a server can answer it as an HTTP error unchanged."""

from __future__ import annotations

from lm_core.errors import LMDeployError

BAD_REQUEST = 400
UNPROCESSABLE = 422


class MediaError(LMDeployError, ValueError):
    """Media input that was refused or could not be fetched.

    `status_code` is 400 when the input itself breaks the policy or is not a usable image (a scheme, host, address,
    path, size, pixel count, format or item count that is refused, including on a redirect hop) and 422 when an
    acceptable URL could not be fetched (DNS failure, connection error, timeout, upstream error status, too many
    redirects, a body over the byte cap). `param` names the request field ("image_url", "video_url") and `code` the
    reason in one snake_case word ("blocked_address", "too_large", ...), so lm-serve maps the error to an OpenAI error
    body field by field. The message names the reason; it never contains fetched bytes.
    """

    def __init__(self, message: str, *, code: str, status_code: int = BAD_REQUEST, param: str = "image_url") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code
        self.param = param

    def __reduce__(self) -> tuple[object, tuple[str, str, int, str]]:
        # Keyword-only fields: the default exception pickling (cls(*args)) would drop them, and a loader running in a
        # worker process hands its errors back pickled.
        return _rebuild, (self.message, self.code, self.status_code, self.param)

    def __repr__(self) -> str:
        return f"MediaError({self.message!r}, code={self.code!r}, status_code={self.status_code}, param={self.param!r})"


def _rebuild(message: str, code: str, status_code: int, param: str) -> MediaError:
    return MediaError(message, code=code, status_code=status_code, param=param)


def refused(message: str, code: str) -> MediaError:
    """A 400 error: the input breaks the policy or is not usable media."""
    return MediaError(message, code=code, status_code=BAD_REQUEST)


def fetch_failed(message: str, code: str) -> MediaError:
    """A 422 error: an acceptable URL whose fetch failed."""
    return MediaError(message, code=code, status_code=UNPROCESSABLE)
