"""The HTTP routes by concern, each module a ``router(ctx)`` factory that ``create_app`` includes:
operations (index, health, readiness, metrics, models), inference, the OpenAI-compatible chat
surface and support sets. Bodies are read and answers written by :mod:`comneck_server.transport`."""
