"""Celery side of Typhon: the app, its one task, pool start-up."""
