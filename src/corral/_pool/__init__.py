"""The supervised worker pool. It knows jobs and workers, nothing of schedulers.

This package's ``__init__`` stays empty so that a worker process, which imports
``corral._pool._worker``, loads only the modules it needs.
"""
