"""In-memory fakes of the ledger, the queue and the mail store, for fast logic tests.

Like dramatiq's StubBroker: real behaviour, no server. They implement `mailflow.ports` and
model what the worker's correctness rests on: conditional writes fenced by lease tokens (and
the item as it was when a condition fails), visibility timeouts, receive counts and the DLQ
redrive at maxReceiveCount, message attributes, object sizes and missing objects. Time comes
from an injectable clock (`ManualClock`), so a test moves time instead of sleeping.

tests/contract runs one suite against these and against a moto server over HTTP, so they
cannot drift from the real services.
"""

from mailflow.testing.backend import fake_backend
from mailflow.testing.clock import ManualClock
from mailflow.testing.keyslots import FakeKeySlots
from mailflow.testing.ledger import FakeLedger
from mailflow.testing.processor import ScriptedProcessor, behave_route
from mailflow.testing.queue import FakeQueue, QueuedMessage
from mailflow.testing.ses import receive_mail
from mailflow.testing.store import FakeStore

__all__ = [
    "FakeKeySlots",
    "FakeLedger",
    "FakeQueue",
    "FakeStore",
    "ManualClock",
    "QueuedMessage",
    "ScriptedProcessor",
    "behave_route",
    "fake_backend",
    "receive_mail",
]
