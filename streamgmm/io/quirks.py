"""Where a broker differs from Apache Kafka in ways the daemon must work around, in one place.

The embedded broker (Tansu 0.6, :mod:`streamgmm.embedded`) speaks the Kafka protocol but differs
from Apache Kafka in a few ways that change what correct client code must do. Each workaround
the daemon has for one is a field of :class:`BrokerQuirks`, so that no production code path is
shaped by a broker without saying so; ``tests/test_broker_differences.py`` shows each difference
on both brokers (and fails on the Tansu release that fixes one, so the workaround can go).

The configuration picks the set (``[kafka] broker_quirks``):

``"tansu"`` (the default)
    Every workaround on. They are correct on every broker — on Apache Kafka they only cost a
    second of recovery time and a transaction's worth of fencing on record-less batches — so
    the default breaks no existing set-up, embedded or not.
``"none"``
    Apache Kafka (and other brokers that behave like it: Confluent, MSK, Redpanda): no
    workaround. The recovery read-back stops at the output topics' end offsets, and every
    exactly-once batch is one transaction.

What is not a quirk: reading the output topics back on recovery at all. Tansu needs it (it makes
an aborted or abandoned transaction's records visible), but at-least-once delivery needs it on
every broker, so the daemon always does it.

Examples
--------
>>> BrokerQuirks.named("none")  # doctest: +NORMALIZE_WHITESPACE
BrokerQuirks(readback_until_silence=False, plain_commit_when_nothing_to_publish=False,
             fences_stale_group_metadata=True)
>>> BrokerQuirks.named("tansu").readback_until_silence
True
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BrokerQuirks", "QUIRK_SETS"]


@dataclass(frozen=True)
class BrokerQuirks:
    """The broker workarounds the daemon applies.

    Parameters
    ----------
    readback_until_silence : bool
        Read the output and dead-letter topics back on recovery until nothing new arrives for a
        second, instead of up to their end offsets. **Tansu**: its ListOffsets answers the last
        record *batch*'s base offset + 1 instead of the end offset, to every client, so reading
        "to the end" would stop early and re-publish what is already out
        (``test_end_offsets_count_records_not_batches``). Apache Kafka's end offsets are right.
    plain_commit_when_nothing_to_publish : bool
        In exactly-once mode, commit the offsets of a batch with nothing to publish (the common
        case) with a plain offset commit instead of a transaction that holds only offsets.
        **Tansu** drops the offsets of an offsets-only transaction other than a producer's
        first, with either client (``test_a_transaction_that_holds_only_offsets_commits_them``),
        so the group would re-read those batches after a restart. A plain commit is atomic by
        itself, but it is not fenced by the producer's epoch: on Apache Kafka every batch goes
        through the transaction.
    fences_stale_group_metadata : bool
        Whether the broker refuses the offsets of a transaction (and a plain commit) sent with a
        consumer's stale group metadata (KIP-447): a zombie replica (frozen past its session
        timeout while its partitions moved, then resumed) cannot commit for the partitions it
        lost; the sink raises :class:`~streamgmm.io.base.PartitionsLost`. **Tansu** accepts
        them, so the zombie's offsets rewind the group's committed offsets
        (``test_a_zombie_cannot_commit_with_its_stale_group_metadata``): the daemon must not
        rely on the broker there and check itself that it still owns a partition (a lease
        shorter than the session timeout) before it publishes. Apache Kafka fences.
    """

    readback_until_silence: bool = False
    plain_commit_when_nothing_to_publish: bool = False
    fences_stale_group_metadata: bool = True

    @classmethod
    def named(cls, name: str) -> BrokerQuirks:
        """The quirk set called ``name`` (:data:`QUIRK_SETS`: ``"tansu"`` or ``"none"``)."""
        try:
            return QUIRK_SETS[name]
        except KeyError:
            raise ValueError(f"unknown broker quirks {name!r}; one of {sorted(QUIRK_SETS)}"
                             ) from None


#: The quirk sets ``[kafka] broker_quirks`` names.
QUIRK_SETS: dict[str, BrokerQuirks] = {
    "tansu": BrokerQuirks(readback_until_silence=True, plain_commit_when_nothing_to_publish=True,
                          fences_stale_group_metadata=False),
    "none": BrokerQuirks(),
}
