"""The explorer's bounded state: a thread-safe LRU cache bounded in bytes that computes each missing entry once, the
few threads that do the computing, and one background worker for the slow jobs (feature visualizations, the
folder's top-k scan) with a bounded queue."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class HttpError(Exception):
    """A refusal with its HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, *, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class Pending(HttpError):
    """202: the answer is being computed in the background; ask again."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(202, message, headers={"Retry-After": str(retry_after)})


def nbytes(value, _seen=None) -> int:
    """Memory held by a value made of tensors, bytes, strings and containers of them (tensors sharing a storage
    are counted once; an expanded view costs its storage, not its shape)."""
    seen = set() if _seen is None else _seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, dict):
        return sum(nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v, seen) for v in value)
    return 0


def _find_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc
        return None


_malloc_trim = _find_malloc_trim()
TRIM_EVERY = 64 << 20
_freed = [0]
_trim_lock = threading.Lock()


def release_freed_memory(freed: int) -> None:
    """Hands the C heap's free memory back to the OS (glibc's malloc_trim) once every TRIM_EVERY bytes evicted.
    glibc keeps freed tensors of a few MB in its heap arenas (its mmap threshold grows to their size once one is
    freed): RSS grew by 440 MB over 200 evictions of 3 MB pictures without this, and fell back with it."""
    if _malloc_trim is None:
        return
    with _trim_lock:
        _freed[0] += freed
        if _freed[0] < TRIM_EVERY:
            return
        _freed[0] = 0
    _malloc_trim(0)


class _Flight:
    """One computation in progress that other threads wait for."""

    def __init__(self):
        self.done = threading.Event()
        self.value = self.error = None


class ByteLRU:
    """A least-recently-used cache holding at most `max_bytes` (as :func:`nbytes` counts them), safe to share
    between threads. ``get_or(key, make)`` returns the cached value or computes it with ``make()`` outside the
    cache's lock; however many threads ask for a missing key at once, ``make`` runs once and the others wait for its
    value (or its exception). A value larger than the whole budget is returned but not kept."""

    def __init__(self, max_bytes: int, name: str = "cache"):
        self.max_bytes, self.name = int(max_bytes), name
        self.bytes = 0
        self._items: OrderedDict = OrderedDict()  # key -> (value, size)
        self._flights: dict = {}
        self._lock = threading.Lock()

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def keys(self) -> list:
        with self._lock:
            return list(self._items)

    def get(self, key, default=None):
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key][0]

    def put(self, key, value) -> bool:
        """Keeps value (evicting the least recently used entries to make room); False if it is over the budget."""
        size, freed = nbytes(value), 0
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            kept = size <= self.max_bytes
            while kept and self._items and self.bytes + size > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self.bytes -= evicted
                freed += evicted
            if kept:
                self._items[key] = (value, size)
                self.bytes += size
        if freed:
            release_freed_memory(freed)
        return kept

    def get_or(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            flight = self._flights.get(key)
            owner = flight is None
            if owner:
                flight = self._flights[key] = _Flight()
        if not owner:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            flight.value = make()
            self.put(key, flight.value)
            return flight.value
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()


_local = threading.local()


def _worker_thread(torch_threads: int | None):
    """A Compute or Jobs thread: its nested lookups compute inline; torch_threads is the number of threads torch's
    ops use from it. ATen's torch.set_num_threads is not per thread: it also sets the process-wide count that every
    thread takes on its first parallel op (the calling thread keeps its own once set). So every explorer thread
    sets its own count explicitly when it starts, whatever another one set before: the model's thread the count
    the process had when the explorer was made, the decoding and job threads one each, so that together they do
    not ask for many more cores than there are. (Not a lower OS priority: a thread descheduled while it holds the
    GIL would stall every other.)"""
    _local.compute = True
    if torch_threads:
        torch.set_num_threads(torch_threads)


class Compute:
    """A few threads that do one kind of heavy work (passes of the model; decoding and encoding pictures): at most
    `threads` at once, however many requests wait (the HTTP workers only look up caches and wait here). ``run(fn)``
    runs fn on one of them and returns its result, or runs it at once when called from any Compute thread (work
    that needs other work never waits for a free thread, so no pool waits on another). Keeping the big allocations
    on a few threads also keeps glibc from giving every HTTP worker its own heap arena."""

    def __init__(self, threads: int, name: str = "lightning-vis-compute", torch_threads: int | None = None):
        self.threads, self.name, self.torch_threads = threads, name, torch_threads
        self._pool = None
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, fn) -> Future:
        """fn queued for one of the threads (started on first use); after close(), a 503 refusal: a closed
        explorer starts no threads again."""
        with self._lock:
            if self._closed:
                raise HttpError(503, "the explorer is shutting down")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name,
                                                initializer=_worker_thread, initargs=(self.torch_threads,))
            return self._pool.submit(fn)

    def run(self, fn):
        return fn() if getattr(_local, "compute", False) else self.submit(fn).result()

    def close(self):
        """Cancels what is queued; the running work ends on its own. Final: nothing is started after it."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class Jobs:
    """Slow work on one background thread (torch ops on one core from it), with at most `limit` jobs waiting or
    running. ``submit(key, fn, what)`` returns the Future of that key's job (an existing one if it is already
    queued); over the limit it refuses with 429. Finished jobs leave the queue: their results live wherever `fn`
    puts them."""

    def __init__(self, limit: int):
        self.limit = limit
        self._worker = Compute(1, "lightning-vis-jobs", torch_threads=1)
        self._futures: dict = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._futures)

    def submit(self, key, fn, what: str) -> Future:
        with self._lock:
            future = self._futures.get(key)
            if future is not None:
                return future
            if len(self._futures) >= self.limit:
                raise HttpError(429, f"{len(self._futures)} slow jobs (feature visualizations, the folder's top-k) "
                                f"are already queued, the limit: ask for {what} again when they are done",
                                headers={"Retry-After": "5"})
            future = self._futures[key] = self._worker.submit(fn)

        def forget(_):
            with self._lock:
                self._futures.pop(key, None)
        future.add_done_callback(forget)
        return future

    def close(self):
        self._worker.close()
