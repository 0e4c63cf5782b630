"""The worker side: the style-transfer engine (``worker.engine``), the Celery tasks that run
it for queued jobs (worker/tasks.py) and the preview workers' (worker/previews.py).
docs/architecture.md maps the modules."""
