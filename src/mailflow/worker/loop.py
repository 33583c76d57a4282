"""The long-running worker: receive, bounded concurrency, heartbeat, graceful shutdown.

Shape (as arq/saq): one stop event; a receiver that only asks SQS for as many messages as it
has room for; one task per message; one heartbeat task that keeps SQS visibility and DynamoDB
leases alive for everything held; a ticker that writes the health file.

Shutdown (ECS sends SIGTERM, then SIGKILL after stopTimeout): stop receiving; give messages
that were prefetched but not started back to SQS at once (visibility 0); let running
deliveries finish within `shutdown_grace_s` while the heartbeat keeps their leases; then
cancel what is left (processors are killed, deliveries handed back as `retrying`) and exit
with EXIT_DRAIN_TIMEOUT. A second signal skips the rest of the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from mailflow.aws import AwsClients, requests_sent
from mailflow.aws.keyslots import KeySlots, SlotRef
from mailflow.aws.ledger import DeliveryKey, Ledger
from mailflow.aws.queue import BATCH, Message, Queue
from mailflow.aws.store import KeyRing, S3Store, make_spool_dir
from mailflow.config import Settings
from mailflow.errors import BadNotificationError, MailflowError, TransientError
from mailflow.exitcodes import EXIT_DRAIN_TIMEOUT, EXIT_OK
from mailflow.mail.notification import (
    MailRef,
    check_recipient_count,
    check_trusted,
    parse_body,
)
from mailflow.ports import Backend, KeySlotsPort, LedgerPort, MailStorePort, QueuePort
from mailflow.processors.exec import ExecProcessor, Processor
from mailflow.routing import DeliveryPlan, Unroutable
from mailflow.signals import stop_signals
from mailflow.worker.delivery import DONE, STAMPS, Deliverer, Settlement, new_token
from mailflow.worker.gate import KeyGate
from mailflow.worker.health import LoopLagProbe, write_health
from mailflow.worker.holds import HoldBook

log = structlog.get_logger("mailflow.worker.loop")

#: After a backend failure, how soon the message may be tried again (SQS redelivers it).
TRANSIENT_PAUSE_S = 15.0

#: A message whose route key (store) is at its max_in_flight_per_key is *parked*: it waits in
#: the worker (visibility kept by the heartbeat) but does not use prefetch room, so one store's
#: flood cannot fill every slot and starve the others. Parked messages are capped at this many
#: per run + prefetch slot; beyond the cap a message is deferred instead (visibility pushed to
#: about when the key will have room: one more receive, counted by the redrive policy).
PARKED_PER_SLOT = 4
#: ...unless its receive count is this close to maxReceiveCount: then it is parked over the cap,
#: never deferred into the DLQ.
DLQ_MARGIN = 2
#: Each heartbeat call (visibility, lease renewal) gets this share of the interval as its
#: deadline, retries included, so a beat ends before the next one is due.
BEAT_DEADLINE_SHARE = 0.8
#: A key whose slots other workers hold is asked again about every half delivery time (one
#: conditional write each time), within these bounds; ±25% jitter keeps workers out of step.
SLOT_POLL_MIN_S = 0.05
SLOT_POLL_MAX_S = 2.0


def make_processor(settings: Settings) -> Processor:
    """The processor transport the settings name: FastCGI (php-fpm sidecar) or exec (default)."""
    if settings.processor_transport == "fastcgi":
        from mailflow.processors.fastcgi import FastCGIProcessor  # noqa: PLC0415 - optional path

        return FastCGIProcessor(
            settings.fastcgi_address,
            settings.runner_script,
            connect_timeout_s=settings.fastcgi_connect_timeout_s,
        )
    return ExecProcessor(nice=settings.processor_nice)


def new_worker_id() -> str:
    """The worker's name on the leases and history it writes: `host:pid:random`, unique per
    process run."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


@dataclass(slots=True)
class HeldMessage:
    """A message this worker holds: its visibility is ours to keep alive or give back."""

    message: Message
    started: bool = False
    parked: bool = False  # waiting for a busy route key; does not count against prefetch
    handler: asyncio.Task[None] | None = None
    leases: dict[DeliveryKey, str] = field(default_factory=dict)
    slots: dict[DeliveryKey, SlotRef] = field(default_factory=dict)  # key slots, renewed too
    tasks: dict[DeliveryKey, asyncio.Task[Any]] = field(default_factory=dict)


def _aws(clients: AwsClients | None) -> AwsClients:
    if clients is None:  # the constructor refuses a worker with neither
        raise RuntimeError("no AWS clients")
    return clients


class Worker:
    """The long-running worker: receives SQS messages, runs each mail's deliveries with bounded
    concurrency, and settles each message once all its deliveries are done or deferred.

    What callers and operators rely on: at most `concurrency` processors run at once, and at
    most `max_in_flight_per_key` per route key (busy keys are parked or deferred, never
    spinning); every message ends deleted (all deliveries terminal), deferred or given back
    for SQS to redeliver, or in the DLQ with a reason (bad notification); a backend failure
    never crashes the worker. A heartbeat keeps SQS visibility and ledger leases alive for
    everything held. `run` returns the exit code: 0 after a clean drain, EXIT_DRAIN_TIMEOUT when
    running deliveries outlived `shutdown_grace_s` and were handed back as `retrying`."""

    def __init__(
        self,
        settings: Settings,
        clients: AwsClients | None,
        processor: Processor | None = None,
        *,
        worker_id: str | None = None,
        clock: Callable[[], float] = time.time,
        backend: Backend | None = None,
    ) -> None:
        """On AWS through `clients`, or on any other `backend` (the in-memory fakes)."""
        if (clients is None) == (backend is None):
            raise ValueError("Worker needs either AWS clients or a backend")
        self.settings = settings
        self.clients = clients
        self._backend = backend
        self.processor = processor or make_processor(settings)
        self.worker_id = worker_id or new_worker_id()
        self._clock = clock
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        self.ledger: LedgerPort
        self.keyslots: KeySlotsPort
        if backend is not None:
            self.ledger, self.keyslots = backend.ledger, backend.keyslots
        else:
            ddb = _aws(clients).dynamodb
            self.ledger = Ledger(ddb, settings.table, clock=clock)
            self.keyslots = KeySlots(ddb, settings.table, clock=clock)
        self.holds = HoldBook(self.keyslots, self.ledger)
        self.queue: QueuePort | None = backend.queue if backend else None
        self._held: dict[str, HeldMessage] = {}  # by receipt handle
        self._room = asyncio.Condition()
        self._run_slots = asyncio.Semaphore(settings.concurrency)
        self._gate = KeyGate()
        self._parked = 0
        self._park_limit = PARKED_PER_SLOT * (settings.concurrency + settings.prefetch_limit)
        self._defer_pace: dict[tuple[str, str], float] = {}  # busy key → next deferral slot
        # Moving average of one delivery's time: paces deferrals. The prior is low on purpose:
        # a deferral that comes back early costs one receive, a late one idles the store.
        self._delivery_s = 0.25
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_poll_s = clock()
        self.stats: dict[str, int] = {
            "received": 0,
            "deleted": 0,
            "dead_lettered": 0,
            "parked": 0,
            "deferred_busy_key": 0,
            "key_slot_busy": 0,  # conditional writes that found every slot of a key held
            "held": 0,
            "max_receive_count": 0,
        }

    @property
    def _queue(self) -> QueuePort:
        if self.queue is None:
            raise RuntimeError("Worker.run() resolves the queue first")
        return self.queue

    # --- signals ----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: drain. Second call: hurry (skip the rest of the grace)."""
        if self.stop.is_set():
            log.warning("shutdown_hurried")
            self.hurry.set()
        else:
            log.info("shutdown_requested", held=len(self._held))
            self.stop.set()

    # --- main -------------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> int:
        """Work until stopped; returns the process exit code. With `handle_signals`, SIGTERM
        and SIGINT call `request_stop` (a second one hurries the drain)."""
        with stop_signals(self.request_stop) if handle_signals else contextlib.nullcontext():
            return await self._run()

    async def _run(self) -> int:
        store: MailStorePort
        if self._backend is not None:
            self.queue, store = self._backend.queue, self._backend.store
        else:
            clients = _aws(self.clients)
            self.queue = await Queue.resolve(clients.sqs, self.settings.queue, self.settings.dlq)
            store = S3Store(clients.s3, KeyRing(clients.kms_in, self.settings.kms_key))
        spool_dir = make_spool_dir(self.settings.spool_dir)
        self.deliverer = Deliverer(
            self.settings,
            self.ledger,
            store,
            self.processor,
            worker_id=self.worker_id,
            spool_dir=spool_dir,
            shutting_down=self.stop.is_set,
            clock=self._clock,
        )
        log.info(
            "worker_started",
            worker=self.worker_id,
            queue=self._queue.url,
            concurrency=self.settings.concurrency,
            transport=self.settings.processor_transport,
            routes=[r.name for r in self.settings.routes],
        )
        await self._refresh_holds()  # before the first receive: a held key never starts
        receiver = asyncio.create_task(self._receive_loop(), name="receiver")
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        ticker = asyncio.create_task(self._health_loop(), name="health")
        holds = asyncio.create_task(self._holds_loop(), name="holds")
        probe = LoopLagProbe.from_env()
        background = [receiver, heartbeat, ticker, holds]
        if probe:
            background.append(asyncio.create_task(probe.run(), name="loop-lag"))
        try:
            await self.stop.wait()
            async with self._room:
                self._room.notify_all()  # a receiver waiting for room sees the stop at once
            code, _ = await asyncio.gather(self._drain(), self._last_poll(receiver))
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if probe:
                probe.report()
            await self.processor.close()
            with contextlib.suppress(OSError):
                spool_dir.rmdir()
        log.info("worker_stopped", exit_code=code, aws_requests=requests_sent(), **self.stats)
        return code

    async def _last_poll(self, receiver: asyncio.Task[None]) -> None:
        """Let a long poll in flight finish rather than cancel it: SQS may already have handed
        it messages, which a cancelled request would hide for a whole visibility timeout.
        The receive loop gives whatever arrives after the stop straight back."""
        try:
            async with asyncio.timeout(self.settings.wait_time_s + 5):
                await asyncio.shield(receiver)
        except TimeoutError:
            receiver.cancel()
        except Exception:  # the receiver's own failure must not stop the drain
            log.exception("receiver_failed")

    async def _drain(self) -> int:
        started = time.monotonic()
        async with self._room:
            self._room.notify_all()  # wake handlers waiting for a slot: they hand back
        for held in list(self._held.values()):
            if held.parked and held.handler is not None:
                held.handler.cancel()  # never started: straight back to SQS (visibility 0)
        pending = {t for t in self._tasks if not t.done()}
        log.info("draining", running=len(pending), grace_s=self.settings.shutdown_grace_s)
        hurry = asyncio.create_task(self.hurry.wait())
        try:
            while (pending := {t for t in pending if not t.done()}) and not self.hurry.is_set():
                remaining = self.settings.shutdown_grace_s - (time.monotonic() - started)
                if remaining <= 0:
                    break
                await asyncio.wait(
                    [*pending, hurry], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            hurry.cancel()
        left = [t for t in self._tasks if not t.done()]
        drain_s = round(time.monotonic() - started, 3)
        if not left:
            log.info("drained", drain_s=drain_s)
            return EXIT_OK
        log.warning("grace_exceeded", cancelling=len(left), drain_s=drain_s)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        return EXIT_DRAIN_TIMEOUT

    # --- receiving --------------------------------------------------------------------------

    def _capacity(self) -> int:
        return (
            self.settings.concurrency
            + self.settings.prefetch_limit
            - (len(self._held) - self._parked)
        )

    def _waiting(self) -> int:
        """HeldMessage messages waiting for a run slot (not started, not parked)."""
        return sum(1 for h in self._held.values() if not (h.started or h.parked))

    def _should_receive(self) -> bool:
        room = self._capacity()
        # Fuller receives, fewer calls: while prefetched messages still wait for a run slot
        # there is no hurry, so wait until a whole batch fits.
        return room > 0 and (
            room >= min(BATCH, self.settings.prefetch_limit) or self._waiting() == 0
        )

    async def _receive_loop(self) -> None:
        while not self.stop.is_set():
            async with self._room:
                await self._room.wait_for(lambda: self._should_receive() or self.stop.is_set())
            if self.stop.is_set():
                return
            try:
                messages = await self._queue.receive(
                    self._capacity(),
                    self.settings.wait_time_s,
                    self.settings.visibility_timeout_s,
                )
            except MailflowError as exc:
                log.warning("receive_failed", error=str(exc))
                await asyncio.sleep(1.0)
                continue
            self._last_poll_s = self._clock()
            if self.stop.is_set():
                await self._give_back(messages)
                return
            for msg in messages:
                self.stats["received"] += 1
                self.stats["max_receive_count"] = max(
                    self.stats["max_receive_count"], msg.receive_count
                )
                held = self._held[msg.receipt_handle] = HeldMessage(msg)
                task = asyncio.create_task(self._handle(msg), name=f"msg-{msg.message_id}")
                held.handler = task
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                # One handler's first step (parse, claim request: ~2 ms of CPU) per loop turn,
                # not a whole batch's worth in one stall of the event loop.
                await asyncio.sleep(0)

    async def _give_back(self, messages: list[Message]) -> None:
        """Received after the stop: visible again at once, for another worker."""
        if messages:
            log.info("returned_after_stop", count=len(messages))
            await asyncio.gather(
                *(self._queue.set_visibility(m, 0) for m in messages), return_exceptions=True
            )

    async def _release_room(self, msg: Message) -> None:
        self._held.pop(msg.receipt_handle, None)
        async with self._room:
            self._room.notify_all()

    # --- one message ------------------------------------------------------------------------

    async def _handle(self, msg: Message) -> None:
        try:
            try:
                ref = parse_body(msg.body)
                check_trusted(ref, self.settings.allowed_buckets, self.settings.incoming_prefix)
                check_recipient_count(ref, self.settings.max_recipients)
            except BadNotificationError as exc:
                log.warning(
                    "dead_letter", message_id=msg.message_id, reason=exc.reason, detail=exc.detail
                )
                await self._queue.dead_letter(msg, exc.reason, exc.detail)
                self.stats["dead_lettered"] += 1
                return
            fates = [await self._one_recipient(msg, ref, r) for r in ref.recipients]
            held = self._held.get(msg.receipt_handle)
            if held is not None and not held.started:
                # Nothing ran (deferred for a busy key, unroutable): settling is one batched
                # SQS call, and it need not hold a prefetch slot while it is on its way.
                await self._release_room(msg)
            await self._settle(msg, fates)
        except asyncio.CancelledError:
            if self.stop.is_set():
                # Forced shutdown: hand the message back to SQS for another worker, at once if
                # nothing ran, else once the cancelled processor is surely gone.
                held = self._held.get(msg.receipt_handle)
                back_s = (
                    self.processor.settle_s(self.settings.kill_grace_s)
                    if held is not None and held.started
                    else 0.0
                )
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._queue.set_visibility(msg, back_s))
            raise
        except TransientError as exc:
            log.warning("message_transient_failure", message_id=msg.message_id, error=str(exc))
            with contextlib.suppress(Exception):
                await self._queue.set_visibility(msg, TRANSIENT_PAUSE_S)
        except Exception:
            # Never crash the worker for one message. It stays in SQS; its receive count grows
            # with each try, and the redrive policy moves it to the DLQ in the end.
            log.exception("message_failed", message_id=msg.message_id)
        finally:
            await self._release_room(msg)

    async def _one_recipient(self, msg: Message, ref: MailRef, recipient: str) -> Settlement:
        held = self._held[msg.receipt_handle]
        plan = self.deliverer.plan(ref, recipient)
        if isinstance(plan, Unroutable):
            return await self.deliverer.record_final(ref, recipient, plan.reason, plan.detail, None)
        quarantine = self.deliverer.quarantine_reason(ref)
        if quarantine is not None:
            return await self.deliverer.record_final(
                ref, recipient, "quarantined", quarantine, plan.route
            )
        if self.holds.covering(plan.route, plan.key) is not None and await self.holds.park(
            self.deliverer, ref, recipient, plan
        ):
            self.stats["held"] += 1
            return DONE  # in the table's hold queue now; `mailflow release` queues it again
        gate = (plan.route, plan.key, plan.max_in_flight_per_key)
        parked = self._gate.busy(*gate)
        if parked:
            if not self._may_park(msg):
                return self._defer_busy_key(msg, plan)
            await self._park(held)
        try:
            async with self._gate.slot(*gate, order=ref.received_at_s):
                self._unpark(held)
                return await self._run_delivery(msg, ref, recipient, plan, held)
        finally:
            self._unpark(held)  # cancelled while parked

    def _may_park(self, msg: Message) -> bool:
        """Room in the parked set, or too close to the DLQ to be deferred."""
        near_dlq = msg.receive_count >= self.settings.max_receive_count - DLQ_MARGIN
        return self._parked < self._park_limit or near_dlq

    async def _park(self, held: HeldMessage) -> None:
        held.parked = True
        self._parked += 1
        self.stats["parked"] += 1
        async with self._room:
            self._room.notify_all()  # parked messages leave prefetch room: receive more

    def _unpark(self, held: HeldMessage) -> None:
        if held.parked:
            held.parked = False
            self._parked -= 1

    def _defer_busy_key(self, msg: Message, plan: DeliveryPlan) -> Settlement:
        """Over the parking cap: come back when the key is likely to have room. Deferrals of
        one key are paced one delivery-time apart, so each costs about one receive."""
        now = self._clock()
        name = (plan.route, plan.key or "")
        step = self._delivery_s / (plan.max_in_flight_per_key or 1)
        ahead = self._gate.waiting(plan.route, plan.key)
        until = max(now + ahead * step, self._defer_pace.get(name, 0.0)) + step
        self._defer_pace[name] = until
        if len(self._defer_pace) > 1024:  # forget keys whose schedule has passed
            self._defer_pace = {k: t for k, t in self._defer_pace.items() if t > now}
        self.stats["deferred_busy_key"] += 1
        log.debug(
            "deferred_busy_key",
            message_id=msg.message_id,
            route=plan.route,
            key=plan.key,
            receive_count=msg.receive_count,
            defer_s=round(until - now, 1),
        )
        return Settlement(defer_until_s=until)

    async def _run_delivery(
        self, msg: Message, ref: MailRef, recipient: str, plan: DeliveryPlan, held: HeldMessage
    ) -> Settlement:
        key = DeliveryKey(ref.mail_id, recipient)
        token = new_token()  # the delivery's lease token, and its key slot's
        slot: SlotRef | None = None
        if plan.key is not None and plan.max_in_flight_per_key is not None:
            taken = await self._take_key_slot(msg, plan, key, token, held)
            if isinstance(taken, Settlement):
                return taken
            slot = taken  # and a run slot is ours
        elif not await self._acquire_run_slot():
            return Settlement(defer_until_s=self._clock())  # shutting down before we started
        if self.holds.covering(plan.route, plan.key) is not None:
            # Held while it waited for its slots: no run may start after `mailflow hold`.
            self._run_slots.release()
            if slot is not None:
                await self._release_key_slot(slot)
            if await self.holds.park(self.deliverer, ref, recipient, plan):
                self.stats["held"] += 1
                return DONE
            return Settlement(defer_until_s=self._clock())  # lifted meanwhile: straight back
        admitted = self._clock()
        try:
            held.started = True
            async with self._room:
                self._room.notify_all()  # one fewer waiting: the receiver may want a batch now
            ctx = contextvars.copy_context()  # this delivery's own latency stamps
            ctx.run(STAMPS.set, {"received": msg.received_at_s, "admitted": admitted})
            # One lease dict per held message: a worker can hold the same delivery twice (a
            # stalled run and its own takeover), and each run's lease is renewed on its own.
            task = asyncio.create_task(
                self.deliverer.deliver(
                    ref, plan, recipient, held.leases, message_id=msg.message_id, token=token
                ),
                context=ctx,
            )
            held.tasks[key] = task
            if slot is not None:
                held.slots[key] = slot  # the heartbeat renews it with the lease
            try:
                return await task
            finally:
                held.tasks.pop(key, None)
                # A moving average of one delivery's time paces deferrals of busy keys.
                self._delivery_s += (self._clock() - admitted - self._delivery_s) / 8
        finally:
            self._run_slots.release()
            if slot is not None:
                held.slots.pop(key, None)
                await self._release_key_slot(slot)

    async def _take_key_slot(
        self, msg: Message, plan: DeliveryPlan, key: DeliveryKey, token: str, held: HeldMessage
    ) -> SlotRef | Settlement:
        """A run slot, then one of the key's slots in the table (before the claim: waiting
        holds no delivery lease, so duplicates and takeovers are not held up by it).

        While other workers hold every slot of the key the message is parked: no run slot,
        no prefetch room, its visibility kept by the heartbeat, its receive count unchanged.
        It asks again every `_slot_poll_s()`. Returns the slot (with the run slot taken) or
        the message's fate when it cannot wait (over the parking cap, or shutting down)."""
        route, name, limit = plan.route, plan.key or "", plan.max_in_flight_per_key or 1
        try:
            while True:
                if not await self._acquire_run_slot():
                    return Settlement(defer_until_s=self._clock())
                try:
                    slot = await self.keyslots.take(
                        route,
                        name,
                        limit,
                        holder=key,
                        worker=self.worker_id,
                        token=token,
                        lease_s=self.settings.lease_s,
                    )
                except BaseException:
                    self._run_slots.release()
                    # Cancelled (shutdown) or failed after the write may have landed: free
                    # whichever slot carries our token rather than leave it for the expiry.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self.keyslots.release_all(route, name, limit, token))
                    raise
                if slot is not None:
                    return slot
                self._run_slots.release()
                self.stats["key_slot_busy"] += 1
                if not held.parked:
                    if not self._may_park(msg):
                        return self._defer_busy_key(msg, plan)
                    await self._park(held)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._slot_poll_s()):
                        await self.stop.wait()
                if self.stop.is_set():
                    return Settlement(defer_until_s=self._clock())
        finally:
            self._unpark(held)

    def _slot_poll_s(self) -> float:
        base = min(SLOT_POLL_MAX_S, self.settings.heartbeat_interval_s, self._delivery_s / 2)
        return max(SLOT_POLL_MIN_S, base) * random.uniform(0.75, 1.25)  # noqa: S311 - jitter

    async def _release_key_slot(self, slot: SlotRef) -> None:
        """Right after the outcome write; shielded, so a cancelled delivery frees it too. A
        release that fails leaves the slot to expire with its lease (logged)."""
        release = asyncio.ensure_future(self.keyslots.release(slot))
        try:
            await asyncio.shield(release)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await release
            raise
        except Exception as exc:  # the slot expires by itself: log, go on
            log.warning("key_slot_release_failed", route=slot.route, key=slot.key, error=str(exc))

    async def _acquire_run_slot(self) -> bool:
        """Wait for a run slot; False if shutdown started first (the message goes back)."""
        if self.stop.is_set():
            return False
        if not self._run_slots.locked():
            await self._run_slots.acquire()  # free slot: taken without suspending
            return True
        acquire = asyncio.create_task(self._run_slots.acquire())
        stop = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait([acquire, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if acquire.done() and not acquire.cancelled():
            if self.stop.is_set():
                self._run_slots.release()
                return False
            return True
        acquire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquire
        if acquire.done() and not acquire.cancelled():
            self._run_slots.release()
        return False

    async def _settle(self, msg: Message, fates: list[Settlement]) -> None:
        if all(f.done for f in fates):
            await self._queue.delete(msg)
            self.stats["deleted"] += 1
            return
        if any(f.transient for f in fates):
            await self._queue.set_visibility(msg, TRANSIENT_PAUSE_S)
            return
        now = self._clock()
        until = min(f.defer_until_s for f in fates if f.defer_until_s is not None)
        # A second of slack, so the redelivered copy finds the lease expired / the retry due.
        await self._queue.set_visibility(msg, max(0.0, until - now) + 1.0)

    # --- leases and heartbeat ---------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The lease outlives three missed beats; log and keep beating.
                log.exception("heartbeat_failed")

    async def _beat(self) -> None:
        """Renew every held visibility and every held lease, each on its own and each bounded
        by BEAT_DEADLINE_SHARE of the interval: a refusing or hanging SQS must not keep the
        DynamoDB leases from being renewed (a lapsed lease lets a redelivered copy run the
        processor again), and one slow beat must not swallow the next."""
        held = list(self._held.values())
        if not held:
            return
        deadline_s = self.settings.heartbeat_interval_s * BEAT_DEADLINE_SHARE
        await asyncio.gather(
            self._extend_visibility(held, deadline_s), self._renew_leases(held, deadline_s)
        )

    async def _extend_visibility(self, held: list[HeldMessage], deadline_s: float) -> None:
        try:
            failed = await self._queue.extend_batch(
                [h.message for h in held], self.settings.visibility_timeout_s, deadline_s=deadline_s
            )
        except MailflowError as exc:
            # The leases are what fence a redelivered copy; the next beat tries again.
            log.warning("visibility_extend_failed", held=len(held), error=str(exc))
            return
        if failed:
            log.warning("visibility_extend_failed", message_ids=failed)

    async def _renew_leases(self, held: list[HeldMessage], deadline_s: float) -> None:
        renewals = [(h, key, token) for h in held for key, token in list(h.leases.items())]
        slots = [(h, key, slot) for h in held for key, slot in list(h.slots.items())]
        results = await asyncio.gather(
            *(
                self.ledger.renew(key, token, self.settings.lease_s, deadline_s=deadline_s)
                for _, key, token in renewals
            ),
            *(
                self.keyslots.renew(slot, self.settings.lease_s, deadline_s=deadline_s)
                for _, _, slot in slots
            ),
            return_exceptions=True,
        )
        self._check_slots(slots, results[len(renewals) :])
        for (h, key, _), ok in zip(renewals, results[: len(renewals)], strict=True):
            if ok is False:
                log.warning("lease_lost", mail_id=key.mail_id, recipient=key.recipient)
                task = h.tasks.get(key)
                if task is not None:
                    task.cancel("lease_lost")  # kills the processor; the new owner records
            elif isinstance(ok, BaseException):
                log.warning("lease_renew_failed", mail_id=key.mail_id, error=str(ok))

    @staticmethod
    def _check_slots(
        slots: list[tuple[HeldMessage, DeliveryKey, SlotRef]], results: list[bool | BaseException]
    ) -> None:
        """A key slot that could not be renewed because it is gone: stop that run."""
        for (h, key, slot), ok in zip(slots, results, strict=True):
            if ok is False:
                # Expired and taken by another worker: the key may now run twice. Stop ours.
                log.warning("key_slot_lost", route=slot.route, key=slot.key, mail_id=key.mail_id)
                task = h.tasks.get(key)
                if task is not None:
                    task.cancel("key_slot_lost")
            elif isinstance(ok, BaseException):
                log.warning("key_slot_renew_failed", key=slot.key, error=str(ok))

    async def _refresh_holds(self) -> None:
        try:
            await self.holds.refresh()
        except Exception as exc:  # the last known holds stay in force
            log.warning("holds_refresh_failed", error=str(exc))

    async def _holds_loop(self) -> None:
        """Operator holds, re-read once per heartbeat interval (one Query per worker)."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self._refresh_holds()

    async def _health_loop(self) -> None:
        """The health file says: the loop turns, and SQS answered recently."""
        path = self.settings.health_file
        while True:
            now = self._clock()
            # A long poll takes wait_time_s; allow that plus the health window before calling
            # the receiver stuck.
            fresh = (
                now - self._last_poll_s < self.settings.health_max_age_s + self.settings.wait_time_s
            )
            if fresh or self.stop.is_set() or self._capacity() <= 0:
                write_health(path, {"worker": self.worker_id, "at": now, "held": len(self._held)})
            await asyncio.sleep(min(5.0, self.settings.health_max_age_s / 3))


__all__ = ["DONE", "Worker", "make_processor"]
