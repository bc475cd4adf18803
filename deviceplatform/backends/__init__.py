"""Django's PostgreSQL and SQLite backends with one step added before every COMMIT: the realtime
event order of the committing transaction (`deviceplatform.realtime.events.take_order`).

Django has no pre-commit hook; `settings.py` names these backends instead of Django's, and they
differ from them in nothing else (same vendor, features, operations and connection pool)."""
