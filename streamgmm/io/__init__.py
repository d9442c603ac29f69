"""The daemon's edges: what it reads and writes, behind written interfaces.

``base``
    the contract: :class:`~streamgmm.io.base.Source`, :class:`~streamgmm.io.base.Sink`,
    :class:`~streamgmm.io.base.Backend`, streamgmm's own
    :class:`~streamgmm.io.base.TopicPartition`, the delivery rule and the errors
``backend``
    :func:`~streamgmm.io.backend.open_backend`: the configured backend
``kafka``, ``confluent``
    the backends on kafka-python and on confluent-kafka, each on its own library only
``memory``
    an in-memory backend for the daemon's unit tests
``quirks``
    :class:`~streamgmm.io.quirks.BrokerQuirks`: the broker workarounds, named
``files``
    JSONL/CSV sources and sinks for ``streamgmm replay``
``probe``
    whether the broker answers, from a thread of its own
"""
