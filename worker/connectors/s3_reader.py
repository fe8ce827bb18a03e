"""Reading listed objects for the bulk job: ``S3Reader`` GETs one object through the one S3 reader
(``core.s3.read_object``) and maps its failures to the exceptions the pipeline turns into failure rows;
``Prefetcher`` runs those GETs in its own thread pool, ahead of decoding, as pipeline ``Item``s."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from captionfleet.core.failures import NOT_FOUND, TIMEOUT, UNAVAILABLE, FetchError, ImageError
from captionfleet.core.s3 import (
    DEFAULT_RETRY,
    Fetched,
    ObjectStore,
    ObjectTooLarge,
    RetryPolicy,
    is_throttling,
    object_failure,
    read_object,
)
from captionfleet.worker.connectors.s3_listing import S3Object


def item_error(error: BaseException, uri: str) -> Exception:
    """The final error of one object's GET as the failure the pipeline reports: the kind the streaming
    fetcher names for the same store answer (``core.s3.object_failure``), with the bulk job's hints."""
    failure = object_failure(error, uri)
    if failure is None:
        return error if isinstance(error, Exception) else RuntimeError(str(error))
    if failure.kind == NOT_FOUND:
        return FetchError(NOT_FOUND, f"{failure.message} (deleted since it was listed?)")
    if is_throttling(error):
        return FetchError(
            failure.kind,
            f"{uri}: {failure.message} (still throttled after retries; lower WORKER_BULK__FETCH_CONCURRENCY)",
        )
    if failure.kind in (TIMEOUT, UNAVAILABLE):
        return FetchError(failure.kind, f"{uri}: {failure.message} (still failing after retries)")
    return failure


class S3Reader:
    """GETs one object with retries; failures come out as the exceptions the pipeline maps to kinds."""

    def __init__(self, client: ObjectStore, *, retry: RetryPolicy = DEFAULT_RETRY, max_bytes: int = 0) -> None:
        self.client = client
        self.retry = retry
        self.max_bytes = max_bytes  # 0 = no limit

    def get(self, obj: S3Object) -> Fetched:
        if self.max_bytes and obj.size > self.max_bytes:
            # Refused from the listing: a huge object is never downloaded just to be rejected.
            raise ImageError(
                "too_large", f"{obj.size} bytes exceeds the limit of {self.max_bytes} bytes (WORKER_IMAGES__MAX_BYTES)"
            )
        if obj.size == 0:
            return Fetched(b"", obj.etag, 0.0, 0)  # nothing to fetch; decoding reports it as empty
        try:
            fetched = read_object(
                self.client, obj.bucket, obj.key, retry=self.retry, what=obj.uri, max_bytes=self.max_bytes
            )
        except ObjectTooLarge as error:
            raise ImageError(
                "too_large",
                f"more than {self.max_bytes} bytes (grown since it was listed at {obj.size}): exceeds the limit "
                "(WORKER_IMAGES__MAX_BYTES)",
            ) from error
        except Exception as error:
            raise item_error(error, obj.uri) from error
        return Fetched(fetched.data, fetched.etag or obj.etag, fetched.seconds, fetched.attempts)


class S3Item:
    """An ``Item`` for the pipeline whose bytes are being fetched in the background."""

    __slots__ = ("_future", "attempts", "etag", "fetch_ms", "obj", "size")

    def __init__(self, obj: S3Object, future: Future[Fetched]) -> None:
        self.obj = obj
        self._future: Future[Fetched] | None = future
        self.etag = obj.etag
        self.size = obj.size
        self.fetch_ms: float | None = None
        self.attempts = 0

    @property
    def id(self) -> str:
        return self.obj.key

    @property
    def uri(self) -> str:
        return self.obj.uri

    def read(self) -> bytes:
        future, self._future = self._future, None  # drop our reference: the bytes go once decoded
        if future is None:
            raise RuntimeError(f"{self.uri} was already read")
        fetched = future.result()
        self.etag, self.size = fetched.etag, len(fetched.data)
        self.fetch_ms, self.attempts = round(fetched.seconds * 1000, 3), fetched.attempts
        return fetched.data


class Prefetcher:
    """Fetches objects in its own thread pool ahead of the pipeline, in order, within bounds.

    The pipeline's decode threads are CPU work; GETs are latency. Keeping them apart lets many GETs be
    in flight (``concurrency``) while decoding uses the cores, so the model never waits on I/O. At most
    ``2 * concurrency`` objects and about ``ahead_bytes`` (by listed sizes) are fetched ahead of what
    the pipeline has taken.
    """

    def __init__(self, reader: S3Reader, *, concurrency: int = 16, ahead_bytes: int = 256 << 20) -> None:
        self.reader = reader
        self.concurrency = concurrency
        self.ahead_bytes = ahead_bytes
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="s3-fetch")
        self._window: deque[S3Item] = deque()  # fetched or fetching, not yet handed out

    def items(self, objects: Iterable[S3Object], on_item: Callable[[S3Item], None] | None = None) -> Iterator[S3Item]:
        """The objects as items, in order; one iteration at a time per Prefetcher."""
        window = self._window
        window_bytes = 0
        source = iter(objects)
        while True:
            try:
                obj = next(source)
            except StopIteration:
                break
            except Exception:
                # The listing failed: what is already fetched still gets its rows, then the error goes on.
                while window:
                    yield window.popleft()
                raise
            # Make room first: an object bigger than the budget still goes, alone.
            while window and (len(window) >= 2 * self.concurrency or window_bytes + obj.size > self.ahead_bytes):
                item = window.popleft()
                window_bytes -= item.obj.size
                yield item
            item = S3Item(obj, self._pool.submit(self.reader.get, obj))
            if on_item is not None:
                on_item(item)
            window.append(item)
            window_bytes += obj.size
        while window:
            yield window.popleft()

    def close(self) -> None:
        # Fetches never handed out are not needed any more (the run stopped early); items already
        # handed out still complete, so whoever holds them can read them.
        for item in self._window:
            if item._future is not None:
                item._future.cancel()
        self._window.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
