"""Message bodies fetched ahead of their use, over extra IMAP connections of the account.

The sync loop decides, records and submits in one thread (so dedup stays exact);
what it waits on is the network. The prefetcher keeps up to one batch per extra
connection in flight, each connection with the folder EXAMINEd, and hands the
batches back in order. Memory stays bounded: at most `connections` batches, each
bounded in bytes. With one connection (`fetch.connections: 1`) bodies are fetched
inline over the account's main connection.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from imapsync.errors import SourceError, SourceErrorKind
from imapsync.imap_source import ImapSource


class BodyPrefetcher:
    def __init__(self, connect: Callable[[], ImapSource], extra_connections: int):
        self._connect = connect
        self._n = max(0, extra_connections)
        self._executor = ThreadPoolExecutor(self._n, thread_name_prefix="fetch") if self._n else None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sources: list[ImapSource] = []

    def _fetch(self, folder: str, uidvalidity: int, uids: list[int]) -> dict[int, bytes]:
        """In a fetch thread: its own connection, with `folder` examined."""
        local = self._local
        try:
            if getattr(local, "source", None) is None:
                local.source, local.folder = self._connect(), None
                with self._lock:
                    self._sources.append(local.source)
            if local.folder != folder:
                if local.source.examine(folder) != uidvalidity:
                    raise SourceError(SourceErrorKind.UNREACHABLE, "UIDVALIDITY changed during the pass", folder)
                local.folder = folder
            return local.source.fetch_bodies(uids, folder)
        except SourceError:
            source, local.source = getattr(local, "source", None), None  # reconnect on next use
            if source is not None:
                source.close()
            raise

    def bodies(self, primary: ImapSource, folder: str, uidvalidity: int,
               batches: Iterable[list[int]]) -> Iterator[tuple[list[int], dict[int, bytes]]]:
        """(uids, bodies) for each batch, in order."""
        if self._executor is None:
            for batch in batches:
                yield batch, primary.fetch_bodies(batch, folder)
            return
        pending: deque[tuple[list[int], Future]] = deque()
        todo = iter(batches)
        try:
            for batch in todo:
                pending.append((batch, self._executor.submit(self._fetch, folder, uidvalidity, batch)))
                if len(pending) >= self._n:
                    break
            while pending:
                batch, future = pending.popleft()
                result = future.result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, self._executor.submit(self._fetch, folder, uidvalidity, nxt)))
                yield batch, result
        finally:
            for _batch, future in pending:
                future.cancel()
            for _batch, future in pending:  # let running fetches end before the folder changes
                if not future.cancelled():
                    try:
                        future.result()
                    except Exception:  # noqa: BLE001 - already reported through the consumer
                        pass

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            sources, self._sources = self._sources, []
        for source in sources:
            source.close()
