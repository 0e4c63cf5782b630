"""The worker side: the style-transfer engine (``worker.engine``) and, from issue 2/5, the
Celery tasks that run it for queued jobs."""
