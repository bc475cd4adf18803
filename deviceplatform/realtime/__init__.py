"""Realtime notifications: Bayeux/CometD for operations and managed objects (spec realtime.md).

- `subscriptions`: channel families and the channels apps register, with who may subscribe;
- `events`: `publish(RealtimeEvent...)`, the one entry point for apps after commit;
- `store`: sessions, subscriptions and queues (Redis, or this process for the embedded default);
- `hub`: per server process: holding connects and waking them;
- `protocol`: the Bayeux messages, independent of the transport;
- `views` (long-polling) and `consumers` (WebSocket): the two transports;
- `routing`: the four endpoint paths for both."""
