"""The one Gateway object: built at start-up, closed at shutdown, reached via ``GATEWAY``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from spillway.access.audit import AuditTrail
from spillway.access.store import KeyStore, keys_issued
from spillway.access.tokens import hasher_for, shared_database
from spillway.batch.catalog import FileCatalog
from spillway.batch.jobs import BatchStore
from spillway.batch.runner import Workplace
from spillway.batch.service import Batches
from spillway.batch.storage import store_for
from spillway.batch.worker import BatchWorker
from spillway.clock import Clock
from spillway.config.schema import Config, NodeConfig
from spillway.errors import StartupError
from spillway.ledger.budgets import Budgets
from spillway.ledger.costing import Costing, hourly_cost
from spillway.ledger.retention import retention_loop
from spillway.ledger.spool import Spool
from spillway.ledger.sql import SqlLedgerStore, sqlite_url
from spillway.ledger.writer import LedgerWriter
from spillway.nodes.http import HttpNode
from spillway.nodes.managed import ManagedLlamaServer
from spillway.nodes.process_status import ProcessView, StatusFile
from spillway.nodes.signals import MetricsSource, metrics_url
from spillway.nodes.tokens import counter_for
from spillway.nodes.transport import transport_for
from spillway.pii.policy import policy_for
from spillway.pipeline.accounting import Accountant
from spillway.pipeline.admission import Admission
from spillway.pipeline.service import Pipeline, PipelineSettings
from spillway.prices import LIST_PRICES, Exchange, Price
from spillway.resilience.breaker import BreakerBoard, BreakerPolicy
from spillway.resilience.queue import WaitQueue
from spillway.resilience.retry import RetryBudget, RetryPolicy
from spillway.routing.dispatch import Dispatcher
from spillway.routing.monitor import NodeMonitor
from spillway.routing.router import NodeHandle, Router
from spillway.secrets import Redactor
from spillway.server.auth import KeyRing, key_id
from spillway.server.cache_setup import build_cache
from spillway.server.health import HealthBoard
from spillway.server.key_sync import Access, KeySync, start_sync
from spillway.state.budgets import FleetBudgets
from spillway.state.leases import Leases
from spillway.state.limits import RateLimiter
from spillway.state.redis import SharedState
from spillway.state.slots import FleetSlots

log = logging.getLogger("spillway.server")
#: How long the ledger store may take to open at start before the gateway starts without it.
OPEN_TIMEOUT_S = 5.0


@dataclass
class Gateway:
    config: Config
    clock: Clock
    router: Router
    keys: KeyRing
    redactor: Redactor
    health: HealthBoard
    #: a request's whole path (dispatcher, cache, accountant), for every front door
    pipeline: Pipeline
    #: managed keys and the audit trail; None without a database (``[ledger] enabled =
    #: false``) or without a secret for a shared one
    access: Access | None = None
    #: the Files and Batches APIs and this replica's batch worker; None without a database
    batches: Batches | None = None


GATEWAY = web.AppKey("gateway", Gateway)


async def build_gateway(
    config: Config,
    clock: Clock,
    stack: AsyncExitStack,
    supervised: Mapping[str, Path] | None = None,
    processes: int = 1,
) -> Gateway:
    """Start every node (managed ones first wait until they generate) and wire the gateway.

    ``supervised``: nodes another process supervises (``--workers``' parent), each with the
    status file it keeps. ``processes``: how many gateway processes share the port
    (``--workers``); without shared state each enforces that share of the rate limits.
    """
    views: dict[str, ProcessView] = {
        name: StatusFile(path, clock.monotonic) for name, path in (supervised or {}).items()
    }
    shared = await _shared_state(config, clock, stack, processes)
    leases = _leases(config, shared, clock, stack)
    # Without shared state, N workers split each node's slots (at least 1 each).
    split = processes if shared is None else 1
    handles = []
    for name, spec in config.nodes.items():
        base_url, tokenizer = spec.base_url, spec.tokenizer
        if spec.managed is not None:
            key = spec.api_key.get_secret_value() if spec.api_key else None
            logs = config.server.data_dir / "logs"
            server = ManagedLlamaServer(name, spec.managed, logs, clock, api_key=key)
            await server.start()
            stack.push_async_callback(server.aclose)
            views[name] = server
            base_url, tokenizer = server.base_url, tokenizer or server.model_path
        assert base_url is not None  # the schema requires base_url or managed
        handle = _handle(name, spec, base_url, tokenizer, config, stack, split)
        handle.process = views.get(name)
        handles.append(handle)
    router = Router(
        handles, _breakers(config, handles, clock), clock, config.routing.signal_stale_s
    )
    slots = None
    if shared is not None and leases is not None:
        slots = FleetSlots(shared, leases, config.breaker, _pools(handles))
    replicas = (lambda: shared.replicas) if shared is not None else (lambda: 1)
    dispatcher = _dispatcher(config, router, clock, slots, replicas)
    monitor = NodeMonitor(
        router,
        config.routing.signal_interval_s,
        config.breaker.probe_interval_s,
        on_change=lambda handle: _wake_waiters(dispatcher, handle),
    )
    monitor.start()
    stack.push_async_callback(monitor.aclose)
    fleet_budgets = FleetBudgets(shared, leases) if shared and leases else None
    database = await _database(config, stack)
    accountant = await _accountant(config, clock, stack, fleet_budgets, replicas, database)
    ring = KeyRing(config.keys, clock)
    access = await _access(config, database, ring, accountant.budgets, clock, stack)
    cache = await build_cache(config, router, clock, stack)
    redactor = Redactor.for_config(config)
    settings = PipelineSettings(
        config.timeouts.deadline_s, config.cache.cache_tool_calls, config.timeouts.idle_s
    )
    limiter = RateLimiter(clock, shared, leases, local_share=processes)
    admission = Admission(limiter, config.limits.output_reserve_tokens)
    pii = policy_for(config.pii)
    pipeline = Pipeline(
        router, dispatcher, cache, accountant, admission, redactor, clock, settings, pii
    )
    batches = await _batches(config, database, pipeline, redactor, clock, stack, ring)
    return Gateway(
        config=config,
        clock=clock,
        router=router,
        keys=ring,
        redactor=redactor,
        health=HealthBoard(router, clock, shared),
        pipeline=pipeline,
        access=access,
        batches=batches,
    )


async def _shared_state(
    config: Config, clock: Clock, stack: AsyncExitStack, processes: int
) -> SharedState | None:
    """The Redis replicas share (``[state] redis_url``); a Redis down at start is an outage,
    not a failed start."""
    state = config.state
    if state.redis_url is None:
        return None
    shared = SharedState(
        state.redis_url.get_secret_value(),
        clock,
        timeout_s=state.timeout_s,
        namespace=state.namespace,
    )
    shared.replicas = processes  # until Redis counts them: its workers at least
    await shared.open()
    stack.push_async_callback(shared.aclose)
    return shared


def _leases(
    config: Config, shared: SharedState | None, clock: Clock, stack: AsyncExitStack
) -> Leases | None:
    """The places this replica holds in Redis (node slots, max_parallel), renewed."""
    if shared is None:
        return None
    leases = Leases(shared, clock, config.state.lease_s)
    leases.start()
    stack.push_async_callback(leases.aclose)
    return leases


@dataclass(frozen=True, slots=True)
class _Database:
    """The ledger's database (also the keys' and the audit trail's), and why it could not
    be opened at start (None: it is open)."""

    store: SqlLedgerStore
    problem: str | None


async def _database(config: Config, stack: AsyncExitStack) -> _Database | None:
    ledger = config.ledger
    if not ledger.enabled:
        return None
    url = ledger.url.get_secret_value() if ledger.url else sqlite_url(config.server.data_dir)
    store, problem = await _open_store(url)
    stack.push_async_callback(store.aclose)
    return _Database(store, problem)


async def _accountant(
    config: Config,
    clock: Clock,
    stack: AsyncExitStack,
    fleet: FleetBudgets | None,
    replicas: Callable[[], int],
    database: _Database | None,
) -> Accountant:
    """Costing, budgets and the write-behind ledger; closed in reverse: count, flush, close."""
    ledger = config.ledger
    exchange = Exchange(ledger.cny_per_usd)
    prices = {name: price for name, spec in config.nodes.items() if (price := _price(spec))}
    hourly = {
        name: hourly_cost(spec.hardware, exchange, ledger.currency)
        for name, spec in config.nodes.items()
        if spec.hardware is not None
    }
    discounted = {name: _batch_price(spec) for name, spec in config.nodes.items()}
    batch_prices = {name: price for name, price in discounted.items() if price is not None}
    costing = Costing(
        prices,
        hourly,
        LIST_PRICES[ledger.reference],
        exchange,
        ledger.currency,
        clock,
        batch_prices,
    )
    limits = {key_id(k.key.get_secret_value()): k.budget for k in config.keys if k.budget}
    budgets = Budgets(limits, exchange, ledger.currency, clock, fleet, replicas)
    writer = None
    if database is not None:
        store = database.store
        if database.problem is None:
            await budgets.load(store)
        else:
            log.warning(
                "%s; serving anyway: records wait in %s until it answers",
                database.problem,
                "ledger-spool",
            )
            opening = asyncio.create_task(_load_budgets_when_open(store, budgets, clock))
            stack.callback(opening.cancel)
        spool = Spool(config.server.data_dir / "ledger-spool")
        writer = LedgerWriter(store, clock, ledger.flush_interval_s, spool=spool)
        writer.start()
        stack.push_async_callback(writer.aclose)
        if ledger.retention_days:
            task = asyncio.create_task(retention_loop(store, ledger.retention_days, clock))
            stack.callback(task.cancel)
    accountant = Accountant(costing, budgets, writer, clock, ledger.max_output_tokens)
    stack.push_async_callback(accountant.aclose)
    return accountant


#: in the data directory: managed keys were seen, so a gateway that cannot read them at
#: start still requires keys
KEYS_MARKER = "managed-keys-in-use"


async def _access(
    config: Config,
    database: _Database | None,
    ring: KeyRing,
    budgets: Budgets,
    clock: Clock,
    stack: AsyncExitStack,
) -> Access | None:
    """Managed keys, loaded before the first request and followed while running."""
    if database is None:
        return None
    marker = config.server.data_dir / KEYS_MARKER
    if marker.exists():
        ring.seal()
    try:
        hasher = hasher_for(config)
    except StartupError as exc:
        await _seal_if_issued(database, ring)
        log.warning("managed keys are off: %s", exc.message)
        return None
    store = KeyStore(database.store, hasher, clock)
    sync = KeySync(store, hasher, ring, budgets, database.store, clock, marker)
    # A database already known to be down costs the start no more waiting.
    task = await start_sync(sync, OPEN_TIMEOUT_S if database.problem is None else 0.1)
    stack.push_async_callback(_last_touch, sync)
    stack.callback(task.cancel)  # runs first: no poll races the last touch
    return Access(store, AuditTrail(database.store, clock), sync)


async def _seal_if_issued(database: _Database, ring: KeyRing) -> None:
    """Managed keys this replica cannot check (no secret) still end open mode."""
    try:
        async with asyncio.timeout(OPEN_TIMEOUT_S):
            issued = await keys_issued(database.store)
    except Exception:
        return
    if issued:
        ring.seal()
        log.warning("managed keys exist in the database; without the secret they are refused")


async def _batches(
    config: Config,
    database: _Database | None,
    pipeline: Pipeline,
    redactor: Redactor,
    clock: Clock,
    stack: AsyncExitStack,
    ring: KeyRing,
) -> Batches | None:
    """Files in ``[storage]``, batches in the ledger's database, and the worker that runs
    them on spare capacity. Its runners stop before the pipeline closes."""
    if database is None:
        return None
    if shared_database(config) and config.storage.url is None:
        log.warning(
            "batch files go to this replica's data directory while the database is shared: "
            "other replicas cannot read them; set [storage] url to storage they all share"
        )
    store = store_for(config.storage, config.server.data_dir)
    await store.open()
    stack.push_async_callback(store.aclose)
    files = FileCatalog(database.store, store, clock)
    jobs = BatchStore(database.store, clock)
    worker = None
    if config.batch.run:
        place = Workplace(jobs, files, pipeline, redactor, config.batch, clock, ring.still_valid)
        worker = BatchWorker(place)
        worker.start()
        stack.push_async_callback(worker.aclose)
    return Batches(files, jobs, config.batch, worker)


async def _last_touch(sync: KeySync) -> None:
    """When keys were last used, written once more at shutdown (best effort)."""
    try:
        await sync.touch()
    except Exception as exc:
        log.warning("managed keys: last-used times not written (%s)", type(exc).__name__)


def _price(spec: NodeConfig) -> Price | None:
    if isinstance(spec.price, str):
        return LIST_PRICES[spec.price]
    if spec.price is None:
        return None
    p = spec.price
    return Price(p.input_per_mtok, p.output_per_mtok, p.currency)


def _batch_price(spec: NodeConfig) -> Price | None:
    """A node's price for batch lines, when its own price gives a batch discount."""
    if isinstance(spec.price, str) or spec.price is None or not spec.price.batch_discount:
        return None
    p, keep = spec.price, 1 - spec.price.batch_discount
    return Price(p.input_per_mtok * keep, p.output_per_mtok * keep, p.currency)


def _pools(handles: list[NodeHandle]) -> dict[str, list[str]]:
    """Per model, the private nodes serving it: the pools the breakers never empty."""
    pools: dict[str, list[str]] = {}
    for handle in handles:
        if handle.private:
            for model in handle.models:
                pools.setdefault(model, []).append(handle.name)
    return pools


def _breakers(config: Config, handles: list[NodeHandle], clock: Clock) -> BreakerBoard:
    policy = BreakerPolicy(**config.breaker.model_dump(exclude={"probe_interval_s"}))
    return BreakerBoard(policy, clock, _pools(handles))


def _dispatcher(
    config: Config,
    router: Router,
    clock: Clock,
    slots: FleetSlots | None,
    replicas: Callable[[], int],
) -> Dispatcher:
    routing = config.routing
    queues = {m: WaitQueue(routing.queue_size, clock, model=m) for m in router.models()}
    for handle in router.handles:
        for model in handle.models:
            handle.on_release.append(queues[model].notify)
    return Dispatcher(
        router,
        RetryBudget(
            routing.retry_budget_ratio,
            routing.retry_budget_min,
            routing.retry_budget_burst,
            parts=replicas,
        ),
        queues,
        RetryPolicy(routing.max_attempts, routing.backoff_base_s, routing.backoff_cap_s),
        clock,
        ttft_smoothing=routing.ttft_smoothing,
        slots=slots,
    )


def _wake_waiters(dispatcher: Dispatcher, handle: NodeHandle) -> None:
    """A node's state changed (cooled down, recovered): let waiting requests look again."""
    for model in handle.models:
        dispatcher.queues[model].notify_all()


def _handle(
    name: str,
    spec: NodeConfig,
    base_url: str,
    tokenizer: Path | None,
    config: Config,
    stack: AsyncExitStack,
    split: int = 1,
) -> NodeHandle:
    """``split``: how many processes share the node's slots, each keeping to its part."""
    signal_url = spec.metrics_url
    if signal_url is None and spec.load_signal != "none":
        signal_url = metrics_url(base_url, spec.load_signal)
    https = any(url.startswith("https://") for url in (base_url, signal_url or ""))
    if not spec.verify:
        log.warning(
            "node %s: verify = false: its TLS certificate and host name are not checked, so "
            "anyone on the path can read and answer its requests",
            name,
        )
    metrics = None
    try:  # one transport per node: one SSL context, shared by its requests and its scrapes
        transport = transport_for(spec, https=https)
        node = HttpNode(
            name,
            base_url,
            transport,
            max_connections=max(2 * spec.max_concurrency, 32),
            max_response_bytes=spec.max_response_bytes,
        )
        stack.push_async_callback(node.aclose)
        if signal_url is not None and spec.load_signal != "none":
            metrics = MetricsSource(signal_url, transport)
            stack.push_async_callback(metrics.aclose)
    except ValueError as exc:  # a URL, header or TLS file that will not do; never a secret
        raise StartupError(f"nodes.{name}: {exc}") from None
    return NodeHandle(
        name=name,
        kind=spec.kind,
        node=node,
        models=dict(spec.models),
        max_concurrency=max(1, spec.max_concurrency // split),
        weight=spec.weight,
        timeouts=config.timeouts_for(name),
        counter=counter_for(tokenizer),
        load_signal=spec.load_signal,
        metrics=metrics,
        spill_wait_s=min(config.policy_for(m).spill_wait_s for m in spec.models),
    )


def gateway_context(
    config: Config,
    clock: Clock,
    supervised: Mapping[str, Path] | None = None,
    processes: int = 1,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup context that builds the Gateway and tears it down in reverse."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app[GATEWAY] = await build_gateway(config, clock, stack, supervised, processes)
            yield
            log.info("shutting down: closing nodes")

    return context


async def _open_store(url: str) -> tuple[SqlLedgerStore, str | None]:
    """The store, and why it could not be opened yet (None: it is open). A PostgreSQL that
    does not answer is an outage the gateway starts through (records go to the spool, and
    the store opens on its first write that gets through); a SQLite file that cannot be
    opened is a mistake to fix, and stops the start."""
    store = SqlLedgerStore(url)
    try:
        async with asyncio.timeout(OPEN_TIMEOUT_S):  # a frozen server must not hold the start
            await store.open()
    except Exception as exc:
        # The URL may carry a password: name only the scheme and the kind of failure.
        scheme = url.split(":", 1)[0]
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        problem = f"cannot open the ledger ({scheme}): {type(exc).__name__}: {first_line[:200]}"
        if scheme.startswith("postgres"):
            return store, problem
        raise StartupError(
            f"{problem}; check [ledger] url, or set [ledger] enabled = false"
        ) from None
    return store, None


async def _load_budgets_when_open(store: SqlLedgerStore, budgets: Budgets, clock: Clock) -> None:
    """Started while the store was down: read the period's spend once it answers (until
    then each key's spend counts from 0 here, or from Redis's figure with shared state)."""
    delay = 1.0
    while True:
        await clock.sleep(delay)
        try:
            await store.open()
            await budgets.load(store)
        except Exception:  # still down: try again later
            delay = min(delay * 2, 30.0)
            continue
        log.warning("ledger: the store answers again; budgets loaded the period's spend")
        return
