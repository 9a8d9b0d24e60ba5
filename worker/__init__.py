"""The worker: a Celery app whose one task runs a job through ``core.pipeline.run_distillation``.

Nothing in this package imports torch or ``core`` at module level: the Celery prefork parent must stay
torch-free, or the children it forks hang on their first torch op.
"""
