"""The one place that turns ``[kafka] backend`` into a :class:`~streamgmm.io.base.Backend`.

Each backend module imports only its own client library, and only this factory imports a
backend module, so a daemon configured for one library never loads the other.

Examples
--------
>>> from streamgmm.config import KafkaConfig
>>> open_backend(KafkaConfig(backend="kafka-python")).name
'kafka-python'
"""

from __future__ import annotations

from typing import Any

from streamgmm.io.base import Backend

__all__ = ["BACKENDS", "open_backend"]

#: The ``[kafka] backend`` names.
BACKENDS = ("confluent-kafka", "kafka-python")


def open_backend(kafka: Any) -> Backend:
    """The backend of ``kafka`` (a :class:`streamgmm.config.KafkaConfig`); builds no client."""
    if kafka.backend == "confluent-kafka":
        from streamgmm.io.confluent import ConfluentBackend

        return ConfluentBackend(kafka)
    if kafka.backend == "kafka-python":
        from streamgmm.io.kafka import KafkaPythonBackend

        return KafkaPythonBackend(kafka)
    raise ValueError(f"unknown Kafka backend {kafka.backend!r}; one of {BACKENDS}")
