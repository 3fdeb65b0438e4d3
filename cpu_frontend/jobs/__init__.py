"""Durable jobs (``/v1/jobs``): calls that wait without a connection, kept in a store, with
signed webhooks when they end.

May import splitspace.shared, splitspace.session, the door (``cpu_frontend/door``) and the hop
(``cpu_frontend/hop``); the Frontend only through the small interfaces of ``targets.py`` and
``routes.py``'s wiring.
"""
