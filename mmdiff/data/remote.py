"""Reading http(s) shards with a read timeout and a bounded retry, so that a stalled or dead server cannot hang a run.

webdataset's ``gopen`` hands ``http://`` and ``https://`` urls to a ``curl`` subprocess that has a connect timeout
but no read timeout: a server that stops answering mid-transfer blocks the reader (and with it training) forever,
and a server that dies mid-shard only shows as a failed pipe. :class:`HttpShard` reads them with urllib instead: every
socket read waits at most ``timeout`` seconds, and a failed read (a timeout, a reset or closed connection, fewer bytes
than the ``Content-Length``, an HTTP 5xx) reconnects and continues at the byte it stopped at (a ``Range`` request;
a server that ignores it is read from the start again and the bytes already read are dropped), up to ``retries``
times in a row without a new byte, waiting ``backoff``, ``2 * backoff``, ... in between. When the tries are spent it
raises :class:`RemoteShardError`, one line naming the url and the network error; ``shards.read_shard`` turns that
into a counted skip (``network_error``) of the rest of the shard, like a truncated tar.
"""

from __future__ import annotations

import http.client
import math
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

HTTP_RE = re.compile(r"^https?://", re.IGNORECASE)
# Defaults of RemoteOptions: seconds one socket read may wait, reconnections in a row without a new byte, the
# first wait between tries (doubled each time).
REMOTE_TIMEOUT_S = 60.0
REMOTE_RETRIES = 3
REMOTE_BACKOFF_S = 2.0
# HTTP statuses worth another try (a timeout, throttling, the server's own errors); other 4xx are final.
_RETRY_STATUSES = frozenset({408, 425, 429})
# What a failing connection raises: socket errors and timeouts (OSError, urllib's URLError / HTTPError included),
# and http.client's own protocol errors (IncompleteRead on a cut chunked body, a bad status line).
NETWORK_ERRORS = (OSError, http.client.HTTPException)
_CHUNK = 1 << 16


class RemoteShardError(OSError):
    """A remote shard that could not be read: its url and the network error, after the retries were spent."""


@dataclass(frozen=True)
class RemoteOptions:
    """How http(s) shards are read: ``timeout`` seconds per socket read (> 0), ``retries`` reconnections in a row
    without a new byte (>= 0), ``backoff`` seconds before the first retry, doubled for each next one (>= 0)."""

    timeout: float = REMOTE_TIMEOUT_S
    retries: int = REMOTE_RETRIES
    backoff: float = REMOTE_BACKOFF_S

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout, int | float) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"remote shard timeout must be a finite number of seconds > 0, got {self.timeout!r}")
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or self.retries < 0:
            raise ValueError(f"remote shard retries must be an integer >= 0, got {self.retries!r}")
        if not (isinstance(self.backoff, int | float) and math.isfinite(self.backoff) and self.backoff >= 0):
            raise ValueError(f"remote shard backoff must be a finite number of seconds >= 0, got {self.backoff!r}")


def is_http_url(url: str) -> bool:
    """Whether ``url`` is read by :class:`HttpShard` (http:// or https://) rather than by webdataset's gopen."""
    return bool(HTTP_RE.match(url))


def _retriable(err: BaseException) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code in _RETRY_STATUSES
    return True


def _describe(err: BaseException, timeout: float) -> str:
    """The network error in words: a read timeout says how long it waited, urllib's wrapper its reason."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        err = err.reason if isinstance(err.reason, BaseException) else err
    if isinstance(err, TimeoutError):
        return f"no data for {timeout:g} s (read timeout)"
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class HttpShard:
    """A binary, read-only stream of one http(s) shard that times out, reconnects and resumes (module docstring).

    ``failure`` holds the one-line reason once the stream gave up (the message of the RemoteShardError it raised),
    so that a reader that sees only a stopped tar (tarfile may swallow the error) can still tell why.
    """

    def __init__(self, url: str, options: RemoteOptions | None = None) -> None:
        self.url = url
        self.options = options or RemoteOptions()
        self.offset = 0  # bytes handed out so far
        self.length: int | None = None  # the whole shard's size, when the server says it
        self.failure: str | None = None
        self._response: http.client.HTTPResponse | None = None
        self._try(lambda: None)  # connect now, so that a dead server fails at open like a missing file

    # -- the connection

    def _connect(self) -> None:
        headers = {"User-Agent": "mmdiff", "Accept-Encoding": "identity"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        response = urllib.request.urlopen(request, timeout=self.options.timeout)
        try:
            self._start(response)
        except BaseException:
            response.close()
            raise
        self._response = response

    def _start(self, response: http.client.HTTPResponse) -> None:
        """Check where a (re)connection's body starts and line it up with ``offset``."""
        size = response.headers.get("Content-Length")
        size = int(size) if size and size.isdigit() else None
        if self.offset and response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if start is None or int(start.group(1)) != self.offset:
                raise ConnectionError(f"the server resumed at {response.headers.get('Content-Range')!r}")
            return
        if size is not None:
            self.length = size
        to_drop = self.offset  # a 200 to a Range request: the whole shard again; drop what was read before
        while to_drop:
            dropped = len(response.read1(min(to_drop, _CHUNK)))
            if not dropped:
                raise ConnectionError(f"the server sent {self.offset - to_drop} bytes on reconnecting, then stopped")
            to_drop -= dropped

    def _drop_connection(self) -> None:
        if self._response is not None:
            try:
                self._response.close()
            except NETWORK_ERRORS:
                pass
            self._response = None

    def _try(self, action):
        """``action()`` on a live connection, reconnecting after network errors; gives up after ``retries`` tries in
        a row without a new byte (RemoteShardError)."""
        failures, start = 0, self.offset
        while True:
            try:
                if self._response is None:
                    self._connect()
                return action()
            except NETWORK_ERRORS as err:
                self._drop_connection()
                if self.offset > start:  # progress since the last failure: a new run of tries
                    failures, start = 0, self.offset
                failures += 1
                if failures > self.options.retries or not _retriable(err):
                    tries = f"{failures} tr{'ies' if failures != 1 else 'y'}"
                    self.failure = (
                        f"network error reading shard {self.url} at byte {self.offset}: "
                        f"{_describe(err, self.options.timeout)} (gave up after {tries})"
                    )
                    raise RemoteShardError(self.failure) from None
                time.sleep(self.options.backoff * 2 ** (failures - 1))

    # -- the stream

    def _read_some(self, size: int) -> bytes:
        """Up to ``size`` bytes from one socket read (never more than one, so a failure loses nothing)."""
        data = self._response.read1(size)
        if not data and self.length is not None and self.offset < self.length:
            raise ConnectionError(f"the server closed the connection after {self.offset} of {self.length} bytes")
        self.offset += len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes (fewer only at the end of the shard; all that is left for a negative size)."""
        if self.failure is not None:
            raise RemoteShardError(self.failure)
        chunks, got = [], 0
        while size < 0 or got < size:
            want = _CHUNK if size < 0 else min(size - got, _CHUNK)
            data = self._try(lambda want=want: self._read_some(want))
            if not data:
                break
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._drop_connection()

    def __enter__(self) -> HttpShard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HttpShard({self.url!r})"
