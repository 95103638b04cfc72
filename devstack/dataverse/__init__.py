"""Dataverse Web API emulator (a package so its parts import one way).

``state`` (organisation, tables, records, users, limits) over ``odata`` (the query language) and
``security`` (roles and teams); ``api`` is the Flask app over ``state``; ``bulk`` (bulk messages, ``$batch``)
is dispatched from ``api``.  The stack wires it in ``devstack.stack``: ``Registry(org_factory=state.Org)``
and ``api.create_app``.
"""
