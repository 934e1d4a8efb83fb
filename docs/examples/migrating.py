"""From asyncz's ProcessPoolExecutor to corral's: the executor line changes, the tasks do not."""

from asyncz.schedulers import AsyncIOScheduler

from corral import ProcessExecutor

# Before: {"default": {"type": "processpool", "max_workers": 4}}
scheduler = AsyncIOScheduler(
    executors={"default": ProcessExecutor(workers=4, timeout=300, max_memory="1GiB")},
    task_defaults={"max_instances": 1, "coalesce": True},
)
