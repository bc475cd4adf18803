"""Django's PostgreSQL backend; the realtime event order is taken just before COMMIT."""

from django.db.backends.postgresql import base

from deviceplatform.realtime.events import take_order


class DatabaseWrapper(base.DatabaseWrapper):
    def commit(self) -> None:
        take_order(self)
        super().commit()
