"""Kafka edges of the daemon on confluent-kafka (librdkafka): the default, fast backend.

The same source and sink as :mod:`streamgmm.io.kafka` — same methods, same records, same
transaction per batch — on librdkafka, whose C client parses fetched records about five times
faster than kafka-python and commits a transaction in 1–2 ms instead of about 12 ms
(``scripts/bench_daemon.py`` measures both side by side). ``kafka.backend = "kafka-python"``
selects :mod:`streamgmm.io.kafka` instead.

What stays on kafka-python whatever the backend: creating topics, reading first and end offsets
(:class:`streamgmm.io.kafka.OffsetsReader`) and reading back the output topics on recovery
(:func:`streamgmm.io.kafka.read_published_sources`); all rare and none needs speed. (Tansu's end
offsets are wrong for either client; see :class:`~streamgmm.io.kafka.OffsetsReader`.)

Settings: the ``[kafka]`` security keys are translated to librdkafka's names
(:func:`librdkafka_security`); anything else goes under ``[kafka.librdkafka]`` with librdkafka's
own property names (``"fetch.wait.max.ms"``, or ``fetch_wait_max_ms``), checked against librdkafka's
documented properties when the configuration is loaded, without building a client
(:func:`check_librdkafka_settings`).

Examples
--------
>>> librdkafka_security({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
...                      "sasl_plain_username": "svc", "ssl_check_hostname": False})
... # doctest: +NORMALIZE_WHITESPACE
{'security.protocol': 'SASL_SSL', 'sasl.mechanism': 'PLAIN', 'sasl.username': 'svc',
 'ssl.endpoint.identification.algorithm': 'none'}
>>> librdkafka_name("fetch_wait_max_ms"), librdkafka_name("fetch.wait.max.ms")
('fetch.wait.max.ms', 'fetch.wait.max.ms')
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import confluent_kafka as ck
from kafka import TopicPartition

from streamgmm.io.kafka import (
    BatchSink,
    CallTimedOut,
    GroupMember,
    KafkaUnavailable,
    OffsetsReader,
    OutgoingRecord,
    RecordRejected,
    bounded_call,
)

__all__ = [
    "ConfluentSource",
    "ConfluentSink",
    "librdkafka_name",
    "librdkafka_security",
    "check_librdkafka_settings",
    "SENSITIVE_PROPERTIES",
]

logger = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("streamgmm.librdkafka")

#: Consumer settings: the kafka-python backend's choices, in librdkafka's names.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 500,
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "isolation.level": "read_committed",
    "fetch.wait.max.ms": 20,
    "socket.timeout.ms": 10000,
    "reconnect.backoff.max.ms": 2000,
}
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger.ms": 5,
    "message.timeout.ms": 30000,
    "socket.timeout.ms": 10000,
    "reconnect.backoff.max.ms": 2000,
    # Kafka's transaction coordinator answers CONCURRENT_TRANSACTIONS while it still writes the
    # previous transaction's markers, and librdkafka retries after retry.backoff.ms (100 ms by
    # default; Kafka's own Java client retries that one after 20 ms). Measured on Apache Kafka
    # 4.4.0 (records + offsets per transaction): 73 ms per transaction at 100 ms, 18 ms at 10 ms.
    # The backoff still grows exponentially to retry.backoff.max.ms (1 s) while a broker is down.
    "retry.backoff.ms": 10,
}

#: Settings the daemon manages itself; ``[kafka.librdkafka]`` may not override them.
MANAGED = frozenset({
    "bootstrap.servers", "group.id", "auto.offset.reset", "isolation.level",
    "enable.auto.commit", "enable.auto.offset.store", "transactional.id", "logger",
    "on_delivery", "error_cb", "on_assign",
})

_SECURITY_NAMES = {
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
}
#: librdkafka's names of the ``[kafka]`` security keys; set them there, not in the table.
SECURITY_PROPERTIES = frozenset(_SECURITY_NAMES.values()) | {
    "ssl.endpoint.identification.algorithm"}


def librdkafka_name(name: str) -> str:
    """librdkafka's property name for ``name``: underscores become dots unless it has dots."""
    return name if "." in name else name.replace("_", ".")


def librdkafka_security(security: Mapping[str, Any]) -> dict[str, Any]:
    """Translate the ``[kafka]`` security keys (kafka-python names) to librdkafka properties."""
    out: dict[str, Any] = {}
    for name, value in security.items():
        if value is None:
            continue
        if name == "ssl_check_hostname":
            if not value:
                out["ssl.endpoint.identification.algorithm"] = "none"
        else:
            out[_SECURITY_NAMES[name]] = value
    return out


#: librdkafka's sensitive properties (flagged ``_RK_SENSITIVE`` in its ``rdkafka_conf.c``): their
#: values are never shown, in ``--print-config`` or in an error.
SENSITIVE_PROPERTIES = frozenset({
    "sasl.username", "sasl.password", "sasl.oauthbearer.config", "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.file", "sasl.oauthbearer.assertion.private.key.pem",
    "sasl.oauthbearer.assertion.private.key.passphrase", "ssl.key.location", "ssl.key.password",
    "ssl.key.pem", "ssl_key", "ssl.ca.pem", "ssl.keystore.password",
})
_BOOLEANS = {"true": True, "false": False}
#: librdkafka's errors that refuse one record for what it is.
_RECORD_ERRORS = frozenset({ck.KafkaError.MSG_SIZE_TOO_LARGE, ck.KafkaError.RECORD_LIST_TOO_LARGE,
                            ck.KafkaError.INVALID_RECORD})


def check_librdkafka_settings(settings: Mapping[str, Any]) -> str | None:
    """Check ``settings`` against librdkafka's documented properties; return the first
    complaint, or ``None``.

    Names, types, ranges and allowed words come from librdkafka's CONFIGURATION.md
    (:mod:`streamgmm.io.librdkafka_properties`). No client is built, so checking has no side
    effects: no plugin (``plugin.library.paths``) is loaded, no key file read, no thread
    started. The value of a sensitive property is never repeated in a complaint.

    Examples
    --------
    >>> check_librdkafka_settings({"fetch.wait.max.ms": 50}) is None
    True
    >>> print(check_librdkafka_settings({"fetch.wait.max.msec": 50}))
    No such configuration property: "fetch.wait.max.msec" (did you mean "fetch.wait.max.ms"?)
    >>> print(check_librdkafka_settings({"compression.type": "brotli"}))
    Invalid value "brotli" for configuration property "compression.type": one of none, gzip, \
snappy, lz4, zstd
    >>> print(check_librdkafka_settings({"ssl.key.password": 12345}))  # a number, not shown
    None
    >>> print(check_librdkafka_settings({"plugin.library.paths": "/opt/none.so"}))  # not loaded
    None
    """
    from streamgmm.io.librdkafka_properties import PROPERTIES

    for name, value in settings.items():
        if name not in PROPERTIES:
            close = difflib.get_close_matches(name, list(PROPERTIES), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            return f'No such configuration property: "{name}"{hint}'
        _, kind, allowed = PROPERTIES[name]
        problem = _check_value(name, kind, allowed, value)
        if problem:
            shown = "(not shown: sensitive)" if name in SENSITIVE_PROPERTIES else f'"{value}"'
            return f'Invalid value {shown} for configuration property "{name}": {problem}'
    return None


def _check_value(name: str, kind: str, allowed: tuple, value: Any) -> str | None:
    """What is wrong with ``value`` for a property of ``kind``, or ``None``."""
    text = str(value).strip().lower() if not isinstance(value, bool) else str(value).lower()
    if kind == "api":
        return "it is set through librdkafka's API, not in a configuration file"
    if kind == "boolean":
        return None if isinstance(value, bool) or text in _BOOLEANS else "true or false"
    if kind in ("integer", "float"):
        if name in ("acks", "request.required.acks") and text == "all":
            return None
        try:
            number = float(text) if kind == "float" else int(text)
        except ValueError:
            return f"expected {'a number' if kind == 'float' else 'an integer'}"
        if isinstance(value, bool) or (allowed and not allowed[0] <= number <= allowed[1]):
            return f"must be between {allowed[0]} and {allowed[1]}" if allowed else "a number"
        return None
    if kind in ("enum", "flags") and allowed:
        words = [w.strip() for w in text.split(",")] if kind == "flags" else [text]
        if not all(w in allowed for w in words):
            return "one of " + ", ".join(allowed)
    return None


class _ScopeFilter(logging.Filter):
    """Drop librdkafka's note that a property applies to the other client only.

    One ``[kafka.librdkafka]`` table configures both the consumer and the producer; each uses the
    properties that apply to it, which is expected, not worth a warning.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be ignored by this" not in record.getMessage()


_librdkafka_log.addFilter(_ScopeFilter())


def _unavailable(what: str, exc: BaseException) -> KafkaUnavailable:
    error = exc.args[0] if exc.args else exc
    text = error.str() if hasattr(error, "str") else str(error)
    return KafkaUnavailable(f"{what}: {text}")


def _log_error(error) -> None:
    """librdkafka's error callback: errors it recovers from by itself are logged, not raised."""
    _librdkafka_log.warning("librdkafka: %s", error.str())


def _to_confluent(tp: TopicPartition, offset: int | None = None):
    if offset is None:
        return ck.TopicPartition(tp.topic, tp.partition)
    return ck.TopicPartition(tp.topic, tp.partition, offset)


class ConsumedRecord:
    """A consumed record with kafka-python's attribute names, read lazily from a librdkafka message.

    Only ``value`` is read for every record; the rest is read for the few records that become
    anomalies or dead letters.
    """

    __slots__ = ("_message",)

    def __init__(self, message) -> None:
        self._message = message

    @property
    def value(self) -> bytes | None:
        return self._message.value()

    @property
    def key(self) -> bytes | None:
        return self._message.key()

    @property
    def topic(self) -> str:
        return self._message.topic()

    @property
    def partition(self) -> int:
        return self._message.partition()

    @property
    def offset(self) -> int:
        return self._message.offset()

    @property
    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._message.headers()

    def __repr__(self) -> str:
        return f"ConsumedRecord({self.topic}:{self.partition}@{self.offset})"


class ConfluentSource(GroupMember):
    """A consumer-group member that yields micro-batches of raw records (librdkafka).

    Same interface as :class:`streamgmm.io.kafka.KafkaSource`. Newly assigned partitions are held
    (paused) until the next :meth:`poll`, so that the daemon can :meth:`seek` them first; seeks
    take effect at the next :meth:`poll`.

    Parameters
    ----------
    bootstrap_servers, topic, group_id, auto_offset_reset
        As for :class:`~streamgmm.io.kafka.KafkaSource`.
    connect_timeout
        Seconds to wait for the broker's first answer.
    offsets_options
        kafka-python settings (security) for the :class:`~streamgmm.io.kafka.OffsetsReader`
        that reads first and end offsets.
    settings
        Extra librdkafka properties (security included), already in librdkafka's names.

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached within ``connect_timeout`` seconds.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        auto_offset_reset: str = "earliest",
        connect_timeout: float = 5.0,
        offsets_options: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        self.topic = topic
        self.group_id = group_id
        self._held = False  # partitions assigned and paused, waiting for the next poll
        self._starts: dict[TopicPartition, int] = {}  # seeks to apply at the next poll
        common = {"bootstrap.servers": bootstrap_servers, "logger": _librdkafka_log,
                  "error_cb": _log_error, **settings}
        try:
            self._consumer = ck.Consumer({**CONSUMER_DEFAULTS, **common, "group.id": group_id,
                                          "auto.offset.reset": auto_offset_reset})
            self._consumer.list_topics(topic, timeout=connect_timeout)
            self._consumer.subscribe([topic], on_assign=self._on_assign)
        except ck.KafkaException as exc:
            self.close()
            raise _unavailable(f"cannot connect a consumer to {bootstrap_servers}", exc) from exc
        try:
            self._offsets = OffsetsReader(bootstrap_servers, **dict(offsets_options or {}))
        except KafkaUnavailable:
            self.close()
            raise

    def _on_assign(self, consumer, partitions) -> None:
        consumer.assign(partitions)
        consumer.pause(partitions)
        self._held = True

    def _release(self) -> None:
        """Start fetching the held partitions, from where :meth:`seek` put them.

        A seek is applied as an assignment with explicit offsets: librdkafka's own ``seek`` is
        lost when it races the committed-offset lookup that follows an assignment.
        """
        consumer = self._consumer
        assigned = consumer.assignment()
        if self._starts:
            consumer.assign([
                ck.TopicPartition(tp.topic, tp.partition, self._starts.get(
                    TopicPartition(tp.topic, tp.partition), ck.OFFSET_STORED))
                for tp in assigned])
            self._starts = {}
        consumer.resume(consumer.assignment())
        self._held = False

    @property
    def consumer(self):
        """The underlying ``confluent_kafka.Consumer``."""
        return self._consumer

    def poll(self, max_records: int, timeout_ms: int) -> list[ConsumedRecord]:
        """Up to ``max_records`` records that have arrived, waiting at most ``timeout_ms`` for the
        first; ordered per partition."""
        try:
            if self._held or self._starts:
                self._release()
            # What has arrived, without waiting for a full batch (librdkafka's consume() waits
            # until it has max_records or the timeout passed: 130 ms p50 latency at a light
            # load); wait only for the first record.
            messages = self._consumer.consume(max_records, 0)
            if not messages:
                first = self._consumer.poll(timeout_ms / 1000)
                if first is None:
                    return []
                messages = [first]
                if max_records > 1:
                    messages += self._consumer.consume(max_records - 1, 0)
        except ck.KafkaException as exc:
            raise _unavailable("poll failed", exc) from exc
        for message in messages:
            error = message.error()
            if error is not None and error.code() != ck.KafkaError._PARTITION_EOF:
                raise KafkaUnavailable(f"poll failed: {error.str()}")
        # librdkafka interleaves partitions; the daemon wants each partition's records together.
        # The sort is stable (offsets stay ascending) and linear on runs that are already sorted.
        messages.sort(key=ck.Message.partition)
        return [ConsumedRecord(m) for m in messages]

    def _serve_group(self) -> None:
        # Assigned partitions are paused at once (_on_assign): this consumes nothing.
        message = self._consumer.poll(0.1)
        if message is not None and message.error() is not None:
            logger.debug("while joining: %s", message.error().str())

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def committed(self) -> dict[TopicPartition, int | None]:
        """The group's committed offset for each assigned partition (``None`` if none)."""
        try:
            found = self._consumer.committed(self._consumer.assignment(), timeout=10)
        except ck.KafkaException as exc:
            raise _unavailable("reading committed offsets failed", exc) from exc
        return {TopicPartition(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None
                for tp in found}

    def position(self, tp: TopicPartition) -> int:
        """The next offset to fetch; the end of the partition if nothing was fetched yet."""
        if tp in self._starts:
            return self._starts[tp]
        (found,) = self._consumer.position([_to_confluent(tp)])
        return found.offset if found.offset >= 0 else self._offsets.ends([tp])[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Read ``tp`` from ``offset`` on (applied at the next :meth:`poll`)."""
        self._starts[tp] = offset

    def _last_seen_end(self, tp: TopicPartition) -> int | None:
        _, end = self._consumer.get_watermark_offsets(_to_confluent(tp), cached=True)
        return end if end >= 0 else None

    def group_metadata(self):
        return self._consumer.consumer_group_metadata()

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Commit ``offsets`` (next offset to read, per partition) synchronously."""
        try:
            self._consumer.commit(offsets=[_to_confluent(tp, o) for tp, o in offsets.items()],
                                  asynchronous=False)
        except ck.KafkaException as exc:
            raise _unavailable("offset commit failed", exc) from exc

    def close(self) -> None:
        offsets, consumer = getattr(self, "_offsets", None), getattr(self, "_consumer", None)
        self._offsets = self._consumer = None
        if offsets is not None:
            offsets.close()
        if consumer is not None:
            try:
                consumer.close()
            except Exception as exc:  # a dead broker; nothing to do
                logger.debug("closing the consumer: %s", exc)


class ConfluentSink(BatchSink):
    """Publishes a batch's records and commits its input offsets (librdkafka).

    Same interface and guarantees as :class:`streamgmm.io.kafka.KafkaSink`: one transaction per
    batch in ``"exactly-once"`` mode; ``acks=all``, every delivery confirmed, then the offsets
    committed in ``"at-least-once"`` mode.

    Raises
    ------
    KafkaUnavailable
        If the broker cannot be reached or transactions cannot be initialised.
    """

    client_errors = (ck.KafkaException,)
    _unavailable = staticmethod(_unavailable)

    def __init__(
        self,
        bootstrap_servers: str,
        delivery: str = "exactly-once",
        transactional_id: str | None = None,
        operation_timeout: float = 30.0,
        **settings: Any,
    ) -> None:
        super().__init__(delivery, transactional_id, operation_timeout)
        conf = {**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap_servers,
                "logger": _librdkafka_log, "error_cb": _log_error, **settings}
        if delivery == "exactly-once":
            conf["transactional.id"] = transactional_id
        self._producer = None
        try:
            self._producer = ck.Producer(conf)
            if delivery == "exactly-once":
                self._bounded("init_transactions", self._producer.init_transactions,
                              operation_timeout)
        except ck.KafkaException as exc:
            raise _unavailable(f"cannot start a producer on {bootstrap_servers}", exc) from exc

    def _produce(self, records: Sequence[OutgoingRecord], on_delivery=None) -> dict[int, str]:
        """Produce ``records``; returns the records refused, filled in as deliveries report.

        ``on_delivery(error, message)`` is called for every delivery. A record refused for what
        it is (too large) is noted in the returned mapping, by its position in ``records``.
        """
        producer, rejected = self._producer, {}

        def reporter(index):
            def report(error, message) -> None:
                if error is not None and error.code() in _RECORD_ERRORS:
                    rejected[index] = error.str()
                if on_delivery is not None:
                    on_delivery(error, message)
            return report

        for i, r in enumerate(records):
            while True:
                try:
                    producer.produce(r.topic, value=r.value, key=r.key,
                                     headers=r.headers or None, on_delivery=reporter(i))
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    producer.poll(0.05)
                except ck.KafkaException as exc:
                    if exc.args and exc.args[0].code() in _RECORD_ERRORS:
                        raise RecordRejected({i: exc.args[0].str()}) from exc
                    raise
        return rejected

    def _send_all(self, records: Sequence[OutgoingRecord]) -> None:
        failures: list = []

        def on_delivery(error, _message) -> None:
            if error is not None:
                failures.append(error)

        rejected = self._produce(records, on_delivery)
        remaining = self._producer.flush(self.operation_timeout)
        if rejected:
            raise RecordRejected(rejected)
        if failures:
            raise KafkaUnavailable(f"{len(failures)} records were not delivered: "
                                   f"{failures[0].str()}")
        if remaining:
            raise KafkaUnavailable(f"{remaining} records not acknowledged within "
                                   f"{self.operation_timeout:g} s")

    def _bounded(self, what: str, call, timeout: float, *args: Any) -> Any:
        """``call(*args, timeout)``, abandoning the producer if it blocks well past ``timeout``."""
        try:
            return bounded_call(what, timeout + 5.0, call, *args, timeout,
                                client=self._producer, cancel=self.cancel)
        except CallTimedOut:
            self._producer = None  # blocked inside librdkafka: never flushed, closed or reused
            raise

    def _publish_transaction(self, records, offsets, source) -> None:
        producer, timeout = self._producer, self.operation_timeout
        producer.begin_transaction()
        rejected: dict[int, str] = {}
        try:
            rejected = self._produce(records)
            if offsets:
                self._bounded("send_offsets_to_transaction", producer.send_offsets_to_transaction,
                              timeout, [_to_confluent(tp, o) for tp, o in offsets.items()],
                              source.group_metadata())
            self._bounded("commit_transaction", producer.commit_transaction, timeout)
        except Exception as exc:
            if self._producer is not None:
                try:
                    self._bounded("abort_transaction", producer.abort_transaction,
                                  min(timeout, 5.0))
                except Exception as abort_exc:  # the broker may be gone; the next one fences us
                    logger.debug("abort after a failed transaction: %s", abort_exc)
            if rejected and not isinstance(exc, RecordRejected):
                raise RecordRejected(rejected) from exc
            raise

    def close(self, timeout: float = 2.0) -> None:
        if self._producer is None:
            return
        try:
            self._producer.flush(timeout)
        except Exception as exc:  # a dead broker; nothing to do
            logger.debug("closing the producer: %s", exc)
        self._producer = None
