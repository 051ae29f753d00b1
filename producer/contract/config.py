"""Configuration: ADR-0015's YAML structure, `${VAR}` interpolation, validation.

Loading is strict: every key is checked, and a bad config fails at load with one
message that names the file, the key path and the fix. A provider whose API key
(or any other `${VAR}`) is missing from the environment is kept but marked not
configured, with the variable named, so one absent key never crashes the rest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    SecretStr,
    ValidationError,
    model_validator,
)

from llmq.contract.capabilities import CapabilityOverride
from llmq.contract.interpolation import interpolate
from llmq.contract.scheduling import LaneSettings, PoolSettings, all_pools, chain_names, check_routes
from llmq.contract.tiers import TierSettings
from llmq.contract.validation import describe_config_error

CONFIG_ENV = "LLMQ_CONFIG"
DEFAULT_CONFIG_PATHS = (Path("config/llm_service.yaml"), Path("llm_service.yaml"))
#: A link to config/llm_service.yaml that the wheel carries as a file.
PACKAGED_CONFIG = Path(__file__).parents[1] / "data" / "llm_service.yaml"

#: Provider adapters, llmq's own among them, are the entry points of this group
#: (pyproject.toml); the worker's registry loads them, this module only reads their names.
ENTRY_POINT_GROUP = "llmq.providers"
#: What to do when the group is empty: the package was copied, not installed.
REINSTALL_HINT = (
    f"no adapters are registered under the {ENTRY_POINT_GROUP!r} entry points; "
    "install llmq (pip install -e . in a checkout) so its entry points are written"
)
#: Names people use for an adapter that is served by another one.
PROVIDER_TYPE_ALIASES = {"google": "gemini", "palm": "gemini", "azure": "azure_openai", "hf": "huggingface"}

#: Adapter options that hold credentials (Bedrock's AWS secret key and session token, ...).
_SECRET_OPTION = re.compile(r"(secret|password|session_token|api_key|access_key)", re.IGNORECASE)


class ConfigError(ValueError):
    """A config that cannot be used. The message names file, key path and fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelLimits(_Strict):
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)


class RateLimits(_Strict):
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    #: Calls in flight at once across every worker.
    max_concurrent: int | None = Field(default=None, gt=0)
    per_model: dict[str, ModelLimits] = Field(default_factory=dict)
    #: Limits per API key, for providers entered with several keys.
    per_api_key: bool = False
    daily_tokens: int | None = Field(default=None, gt=0)
    daily_cost_usd: float | None = Field(default=None, gt=0)
    #: What a job does when a daily quota is spent: wait for the next day or move on.
    on_quota_exhausted: Literal["wait", "fallback"] = "fallback"
    #: After a call, return the unused part of the reservation (prompt estimate + max_tokens) to
    #: tokens/min, as Anthropic does. False for providers that keep counting max_tokens, like OpenAI:
    #: the call then counts its reported prompt tokens plus max_tokens.
    refund_unused_tokens: bool = True
    #: How the provider counts its per-minute limits: `minute_window` (the safe default: any 60 s
    #: window may be counted, so pacing gives up about a sixtieth of the rate to keep every window
    #: within the limit), or `token_bucket` (it refills a bucket continuously, as Anthropic documents:
    #: pacing runs at the full rate).
    enforced_as: Literal["minute_window", "token_bucket"] = "minute_window"


class ModelPrice(_Strict):
    """USD per million tokens; overrides the maintained price table."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_read_per_mtok: float | None = Field(default=None, ge=0)
    cache_write_per_mtok: float | None = Field(default=None, ge=0)
    reasoning_per_mtok: float | None = Field(default=None, ge=0)


class CacheSettings(_Strict):
    enabled: bool = False
    ttl_s: int = Field(default=3600, gt=0)
    #: Caching a sampled (temperature > 0) answer replays one sample forever.
    only_deterministic: bool = True


class ProviderConfig(_Strict, TierSettings):  # batch_api, service_tier, flex: contract/tiers.py
    type: str | None = None
    enabled: bool = True
    api_key: SecretStr | None = None
    base_url: str | None = None
    models: list[str] = Field(default_factory=list)
    default_model: str | None = None
    #: Requested model -> this provider's model, used when a job falls back here.
    stand_ins: dict[str, str] = Field(default_factory=dict)
    rate_limits: RateLimits = Field(default_factory=RateLimits)
    timeout_s: float = Field(default=60.0, gt=0, alias="timeout")
    pricing: dict[str, ModelPrice] = Field(default_factory=dict)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    #: Adapter-specific settings (api_version, region, latency_s, ...); each adapter checks its own.
    options: dict[str, Any] = Field(default_factory=dict)
    #: Model name or fnmatch pattern ("*": every model) -> capabilities laid over the adapter's
    #: defaults (producer/data/capabilities.yaml), e.g. {"*": {tools: true}} for a vLLM started with tools.
    capabilities: dict[str, CapabilityOverride] = Field(default_factory=dict)

    # Filled by the loader, never from YAML.
    name: str = Field(default="", exclude=True)
    missing_env: tuple[str, ...] = Field(default=(), exclude=True)

    @property
    def adapter_type(self) -> str:
        kind = self.type or self.name
        return PROVIDER_TYPE_ALIASES.get(kind, kind)

    @property
    def configured(self) -> bool:
        return self.enabled and not self.missing_env

    @property
    def not_configured_reason(self) -> str | None:
        if not self.enabled:
            return "disabled in config (enabled: false)"
        if self.missing_env:
            return "environment variable not set: " + ", ".join(self.missing_env)
        return None

    def model_for(self, requested_model: str) -> str | None:
        """The model this provider should run for a job that asked for `requested_model`."""
        if requested_model in self.stand_ins:
            return self.stand_ins[requested_model]
        if requested_model in self.models or not self.models:
            return requested_model
        # No silent swap to an arbitrary model: only a stand-in or an explicit default.
        return self.default_model

    def serves(self, model: str) -> bool:
        return model in self.models


class RetrySettings(_Strict):
    #: Attempts on one provider before the job moves to the next one on its route.
    max_attempts_per_provider: int = Field(default=3, ge=1, le=20)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)
    #: A provider's `retry-after` is honoured up to this many seconds.
    retry_after_cap_s: float = Field(default=120.0, gt=0)
    #: Times an answer that does not match the requested JSON schema is asked for again on the
    #: same provider before the job moves on along its route (OutputValidationError).
    invalid_output_retries: int = Field(default=1, ge=0, le=10)


class JobSettings(_Strict):
    #: A job not finished this long after submission fails with DeadlineExceeded.
    deadline_s: float = Field(default=3600.0, gt=0)
    #: How long job records and results stay in Redis after a job ends.
    result_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    #: A running job whose worker stops renewing its lease this long is re-run.
    lease_s: float = Field(default=30.0, gt=0)


class HealthSettings(_Strict):
    """Health checks (Celery beat) and the circuit breaker each provider entry has.

    The breaker judges the provider over a sliding window of calls (a job that fails
    again counts once), so a few requests a provider can never answer do not open it.
    """

    #: Seconds between two `health_check()` calls of a provider (sent by beat).
    interval_s: float = Field(default=30.0, gt=0)
    #: The sliding window, in seconds, the breaker counts calls over.
    window_s: float = Field(default=60.0, gt=0)
    #: Calls in the window (jobs counted once, health checks) before the failure rate is judged.
    minimum_calls: int = Field(default=10, ge=1)
    #: Share of the window's calls that failed (0 to 1) at which the circuit opens.
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    #: Seconds an open circuit skips the provider before probes are let through.
    cooldown_s: float = Field(default=30.0, gt=0)
    #: Probes (health checks of the breaker's own) a half-open circuit lets through at once;
    #: the first that succeeds closes it, one that fails opens it for another cool-down.
    half_open_probes: int = Field(default=3, ge=1)


class BudgetSettings(_Strict):
    """Daily spend caps (UTC days), in USD; a caller is the request's metadata["caller"]."""

    #: Caller name -> USD per day; "*" applies to every caller not named.
    per_caller_daily_usd: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    #: Provider entry -> USD per day.
    per_provider_daily_usd: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    #: What a job does once a budget is spent: wait for the next UTC day, or move to the next provider.
    on_exhausted: Literal["hold", "reroute"] = "hold"

    @property
    def enabled(self) -> bool:
        return bool(self.per_caller_daily_usd or self.per_provider_daily_usd)


class ClientSettings(_Strict):
    """How callers (`LLMService`, the `llmq` command) wait on Redis."""

    #: A wait under way gives up after Redis has not answered this long (s); its jobs are not lost.
    redis_unreachable_s: float = Field(default=120.0, gt=0)


class ServiceConfig(_Strict):
    #: A provider entry, or a pool named under `pools`.
    default_provider: str | None = None
    #: Provider entries and pools, in order; a nested list is a pool of its own: [[a, b], c].
    fallback_chain: list[str | list[str]] = Field(default_factory=list)
    #: Named pools: provider entries that share one hop's traffic.
    pools: dict[str, PoolSettings] = Field(default_factory=dict)
    lanes: LaneSettings = Field(default_factory=LaneSettings)
    #: Model -> a model with a larger context window, tried on ContextWindowExceeded.
    context_fallbacks: dict[str, str] = Field(default_factory=dict)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    budgets: BudgetSettings = Field(default_factory=BudgetSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    providers: dict[str, ProviderConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_refer_to_providers(self) -> ServiceConfig:
        known = set(self.providers)
        check_routes(self.default_provider, self.fallback_chain, self.pools, known)
        for name in self.budgets.per_provider_daily_usd:
            if name not in known:
                raise ValueError(
                    f"budgets.per_provider_daily_usd names {name!r}, which is not under providers; "
                    f"use only: {', '.join(sorted(known))}"
                )
        return self


@dataclass(frozen=True)
class LLMConfig:
    """A loaded config: the validated service section plus where it came from."""

    service: ServiceConfig
    path: Path | None

    @property
    def providers(self) -> dict[str, ProviderConfig]:
        return self.service.providers

    def provider(self, name: str) -> ProviderConfig:
        try:
            return self.service.providers[name]
        except KeyError:
            raise ConfigError(
                f"unknown provider {name!r}; configured names: {', '.join(self.service.providers)}"
            ) from None

    def configured_providers(self) -> list[str]:
        return [name for name, entry in self.providers.items() if entry.configured]

    @cached_property
    def pools(self) -> dict[str, PoolSettings]:
        """Every pool: the named ones and the fallback chain's nested lists."""
        return all_pools(self.service.fallback_chain, self.service.pools)

    def chain(self) -> list[str]:
        """The default provider and the fallback chain, as names of entries and pools, in order."""
        return chain_names(self.service.default_provider, self.service.fallback_chain)

    def pool_of(self, provider: str) -> str | None:
        """The pool a provider entry belongs to, if any."""
        return next((name for name, pool in self.pools.items() if provider in pool.members), None)

    def members(self, name: str) -> list[str]:
        """The provider entries a routable name stands for: a pool's members, or the entry itself."""
        pool = self.pools.get(name)
        return list(pool.members) if pool is not None else [name]

    def pool_weights(self, name: str) -> dict[str, float]:
        """Each member's share of a pool's traffic: its weight, else its limit (see `PoolSettings.weights`)."""
        pool = self.pools[name]
        return pool.shares({member: self.providers[member].rate_limits for member in pool.members})

    def secrets(self) -> list[str]:
        """Every API key and credential in the config: what log and error redaction must hide."""
        found: list[str] = []
        for entry in self.providers.values():
            if entry.api_key is not None and entry.api_key.get_secret_value():
                found.append(entry.api_key.get_secret_value())
            for name, value in entry.options.items():
                if _SECRET_OPTION.search(name) and isinstance(value, str) and value:
                    found.append(value)
        return found


def known_provider_types() -> set[str]:
    """Every `type:` a config may name: the adapters' entry-point names and the aliases.

    Read from package metadata, so checking a config imports no adapter (and not the worker).
    """
    names = {entry.name for entry in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return names | set(PROVIDER_TYPE_ALIASES) if names else set()


def resolve_config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    for candidate in DEFAULT_CONFIG_PATHS:
        if candidate.exists():
            return candidate
    if PACKAGED_CONFIG.exists():  # installed without the checkout: the shipped config/llm_service.yaml
        return PACKAGED_CONFIG
    raise ConfigError(
        f"no config file found: pass --config PATH, set {CONFIG_ENV}, "
        f"or create {DEFAULT_CONFIG_PATHS[0]} (see docs/configuration.md)"
    )


def load_config(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> LLMConfig:
    config_path = resolve_config_path(path)
    try:
        text = config_path.read_text()
    except OSError as exc:
        raise ConfigError(f"{config_path}: cannot read config file ({exc.strerror}); check the path") from None
    return parse_config(text, source=config_path, environ=environ)


def parse_config(text: str, source: Path | None = None, environ: dict[str, str] | None = None) -> LLMConfig:
    where = str(source) if source else "<config>"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}:{line} is not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if not isinstance(raw, dict) or "llm_service" not in raw:
        raise ConfigError(f"{where}: top-level key 'llm_service' is missing; the file must start with 'llm_service:'")
    extra_top = sorted(set(raw) - {"llm_service"})
    if extra_top:
        raise ConfigError(f"{where}: {extra_top[0]}: unknown top-level key; put settings under 'llm_service:'")
    missing: dict[str, list[str]] = {}
    section = interpolate(raw["llm_service"], dict(os.environ if environ is None else environ), missing, "llm_service")
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: llm_service: must be a mapping of settings")
    try:
        service = ServiceConfig.model_validate(section)
    except ValidationError as exc:
        raise ConfigError(describe_config_error(where, exc, _SECRET_OPTION)) from None
    known_types = known_provider_types()
    for name, entry in service.providers.items():
        entry.name = name
        prefix = f"llm_service.providers.{name}."
        entry.missing_env = tuple(sorted({var for key, names in missing.items() if key.startswith(prefix) for var in names}))
        if entry.adapter_type not in known_types:
            fix = f"use one of: {', '.join(sorted(known_types))}" if known_types else REINSTALL_HINT
            raise ConfigError(
                f"{where}: llm_service.providers.{name}.type: unknown adapter {entry.adapter_type!r}; {fix}"
            )
    return LLMConfig(service=service, path=source)
