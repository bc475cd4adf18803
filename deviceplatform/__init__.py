"""Device-control platform speaking the Cumulocity IoT REST API."""

from deviceplatform.celery import app as celery_app

__all__ = ("celery_app",)
