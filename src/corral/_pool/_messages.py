"""The messages between the supervisor and a worker.

Every message is one ``Connection.send_bytes`` frame on the worker's private pipe.

Supervisor -> worker: a job frame, ``pickle((reference, args, kwargs))``, or ``STOP`` (an empty
frame) meaning "exit now". A worker runs one job at a time, so no frame needs a job id: the
supervisor knows which job each worker is running.

Worker -> supervisor: a pickled tuple whose first item is one of the tags below. Values a job
produces travel pickled *inside* the tuple as bytes, so a value that fails to unpickle in the
parent never hides which message it came in.
"""

from __future__ import annotations

from dataclasses import dataclass

READY = 0  # (READY, pid): setup and initializer done; the worker takes jobs
INIT_FAILED = 1  # (INIT_FAILED, traceback_text): the initializer raised; the worker exits
RETURNED = 2  # (RETURNED, value_bytes)
RAISED = 3  # (RAISED, exception_bytes | None, type_name, message, traceback_text)
LOG = 4  # (LOG, record_fields)
OUTPUT = 5  # (OUTPUT, stream_name, text)

STOP = b""


@dataclass(frozen=True)
class WorkerOptions:
    """What a worker process needs from the pool, sent once at its start."""

    initializer: str | None
    initargs_bytes: bytes
    log_level: int
    parent_pid: int
    watch_interval: float
    main: tuple[str, str] | None  # how to load the parent's __main__, if a job needs it
    max_result_size: int | None
    preload: tuple[str, ...]
