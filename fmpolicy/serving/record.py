"""Recording what a policy server answers (`ServerConfig.record_dir`, `serve_policy.py --record DIR`),
as openpi's policy recorder does: for debugging a deployment, replaying a robot's requests offline,
or turning served episodes into data.

Each answered request becomes one file `<seq>.msgpack` in the directory (`seq` counts up from 0 and
goes on after the highest number already there, so a restarted server adds to a recording): one
msgpack dict, packed as on the wire (`fmpolicy.serving.packb`: numpy arrays kept), with
`"request"` (the observation dict the client sent, its own key names), `"reply"` (`"actions"` and
`"server_timing"`), `"connection"` (which connection sent it, counted from 0 per server run) and
`"time"` (Unix seconds when the reply was sent). Requests the server refused are not recorded.

Files are written by a background thread, off the event loop and the policy calls, each one
atomically (`fmpolicy.io.atomic_write`: a reader never sees half a file); the directory is held by a
`WriterLock` while the server runs, so two servers never write into one recording. `read_records(dir)`
reads them back in order. A write that fails (a full disk) is reported once on stderr and the
recording stops; serving goes on.
"""

from __future__ import annotations

import queue
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fmpolicy.io import WriterLock, atomic_write, remove_orphans
from fmpolicy.serving.wire import packb, unpackb

RECORD = re.compile(r"^(\d+)\.msgpack$")


def record_files(directory: str | Path) -> list[Path]:
    """The recording's files in the order they were answered."""
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := RECORD.match(p.name))]
    return [p for _, p in sorted(found)]


def read_records(directory: str | Path) -> Iterator[dict[str, Any]]:
    """Each recorded request, in order: {"request", "reply", "connection", "time"} (see the module)."""
    for path in record_files(directory):
        yield unpackb(path.read_bytes())


class Recorder:
    """Writes (request, reply) pairs into `directory` on a background thread; `close()` writes what is
    queued and releases the directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._lock = WriterLock(self.directory, "a policy server recording").acquire()
        remove_orphans(self.directory)  # temporaries of a recorder that was killed mid-write
        files = record_files(self.directory)
        self._next = int(RECORD.match(files[-1].name).group(1)) + 1 if files else 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._failed: BaseException | None = None
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="fmpolicy-recorder", daemon=True)
        self._thread.start()

    def put(self, request: dict, reply: dict, connection: int) -> None:
        if self._failed is None:
            self._queue.put({"request": request, "reply": reply, "connection": connection, "time": time.time()})

    def _run(self) -> None:
        while (record := self._queue.get()) is not None:
            if self._failed is not None:
                continue
            path = self.directory / f"{self._next:08d}.msgpack"
            try:
                data = packb(record)
                atomic_write(path, lambda f, d=data: f.write(d))
            except Exception as e:  # noqa: BLE001 (serving goes on without the recording)
                self._failed = e
                print(f"fmpolicy: recording to {self.directory} stopped at {path.name}: {e}", file=sys.stderr)
                continue
            self._next += 1
            self.written += 1

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._lock.release()
