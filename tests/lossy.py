"""A broker that loses live messages the way a node of a multi-node deployment can, for the
``insufficient_state`` tests (tests/test_python_client.py, and clients/js/test/lossy_server.py for the
Node tests).
Imports nothing from the test suite, so a plain script can use it."""

from __future__ import annotations

from tidings.backends.base import BrokerHandler
from tidings.backends.memory import MemoryBroker
from tidings.protocol import Publication

__all__ = ["LossyBroker"]


class _Filter:
    """Between the broker and the node: drops the live publications of ``dropping`` channels."""

    def __init__(self, handler: BrokerHandler, dropping: set[str]) -> None:
        self.handler = handler
        self.dropping = dropping
        self.deliver_event = handler.deliver_event
        self.lost = handler.lost

    def deliver(self, pub: Publication) -> object:
        return None if pub.channel in self.dropping else self.handler.deliver(pub)


class LossyBroker(MemoryBroker):
    """The memory broker as one node of a multi-node deployment sees a Pub/Sub that drops messages:
    publications of the channels in ``dropping`` are stored (history has them) but never reach this
    node's live fan-out. The test then calls ``node.subscriptions.lost(channel)``, as the broker does when
    it finds the gap."""

    def __init__(self) -> None:
        super().__init__()
        self.dropping: set[str] = set()

    async def start(self, handler: BrokerHandler) -> None:
        await super().start(_Filter(handler, self.dropping))
