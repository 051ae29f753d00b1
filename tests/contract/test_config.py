from __future__ import annotations

from pathlib import Path

import pytest

from llmq.contract.config import PACKAGED_CONFIG, ConfigError, load_config, parse_config
from llmq.contract.models import Hop, LLMRequest
from llmq.contract.routing import RoutingError, larger_context_hop, plan_route

ADR_CONFIG = """
llm_service:
  default_provider: "openai"
  fallback_chain: ["openai", "anthropic", "ollama"]

  providers:
    openai:
      api_key: "${OPENAI_API_KEY}"
      base_url: "https://api.openai.com/v1"
      models:
        - gpt-3.5-turbo
        - gpt-4
        - gpt-4-turbo
      rate_limits:
        requests_per_minute: 60
        tokens_per_minute: 40000

    anthropic:
      api_key: "${ANTHROPIC_API_KEY}"
      models:
        - claude-3-haiku
        - claude-3-sonnet
        - claude-3-opus

    ollama:
      base_url: "http://localhost:11434"
      models:
        - llama2
        - codellama
        - mistral
      timeout: 120
"""


def test_the_adrs_config_loads_as_written() -> None:
    config = parse_config(ADR_CONFIG, environ={"OPENAI_API_KEY": "sk-test"})
    openai, anthropic, ollama = (config.providers[name] for name in ("openai", "anthropic", "ollama"))
    assert config.service.default_provider == "openai"
    assert config.service.fallback_chain == ["openai", "anthropic", "ollama"]
    assert openai.api_key.get_secret_value() == "sk-test" and openai.configured
    assert openai.rate_limits.requests_per_minute == 60 and openai.rate_limits.tokens_per_minute == 40000
    assert ollama.timeout_s == 120 and ollama.configured and ollama.adapter_type == "ollama"
    assert not anthropic.configured
    assert anthropic.not_configured_reason == "environment variable not set: ANTHROPIC_API_KEY"
    assert "sk-test" not in repr(openai)


def test_interpolation_with_defaults_and_types() -> None:
    config = parse_config(
        """
llm_service:
  providers:
    local_a:
      type: lmstudio
      base_url: "${LMSTUDIO_URL:-http://localhost:1234/v1}"
    local_b:
      type: lmstudio
      base_url: "http://${HOST}:${PORT:-1235}/v1"
""",
        environ={"HOST": "gpu-box"},
    )
    assert config.providers["local_a"].base_url == "http://localhost:1234/v1"
    assert config.providers["local_b"].base_url == "http://gpu-box:1235/v1"
    assert {entry.adapter_type for entry in config.providers.values()} == {"lmstudio"}


def test_google_and_palm_map_to_gemini() -> None:
    config = parse_config("llm_service:\n  providers:\n    palm: {api_key: k}\n    g: {type: google, api_key: k}\n", environ={})
    assert config.providers["palm"].adapter_type == "gemini" and config.providers["g"].adapter_type == "gemini"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("llm_service: [", "is not valid YAML"),
        ("other: 1", "top-level key 'llm_service' is missing"),
        ("llm_service:\n  providers: {}\n", "llm_service.providers: "),
        ("llm_service:\n  providers:\n    openai: {rate_limits: {requests_per_minute: sixty}}\n",
         "llm_service.providers.openai.rate_limits.requests_per_minute: "),
        ("llm_service:\n  providers:\n    openai: {rate_limits: {requests_per_minute: -5}}\n", "fix: use a positive number"),
        ("llm_service:\n  providers:\n    openai: {modles: [gpt-4]}\n", "llm_service.providers.openai.modles: Extra inputs"),
        ("llm_service:\n  default_provider: nope\n  providers:\n    openai: {}\n", "default_provider 'nope' is not under providers"),
        ("llm_service:\n  fallback_chain: [openai, ghost]\n  providers:\n    openai: {}\n", "fallback_chain names 'ghost'"),
        ("llm_service:\n  providers:\n    x: {type: telepathy}\n", "llm_service.providers.x.type: unknown adapter 'telepathy'"),
        ("llm_service:\n  providers:\n    openai: {timeout: 0}\n", "llm_service.providers.openai.timeout"),
        ("llm_service:\n  extra: 1\n  providers:\n    openai: {}\n", "llm_service.extra"),
        ("llm: 1\nllm_service:\n  providers:\n    openai: {}\n", "llm: unknown top-level key"),
    ],
)
def test_bad_configs_fail_with_file_key_path_and_fix(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source=Path("conf/llm.yaml"), environ={})
    message = str(caught.value)
    assert message.startswith("conf/llm.yaml")
    assert expected in message
    assert "\n" not in message


def test_config_path_from_argument_env_or_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = tmp_path / "a.yaml"
    explicit.write_text("llm_service:\n  providers:\n    m: {type: mock}\n")
    assert load_config(explicit).path == explicit
    monkeypatch.setenv("LLMQ_CONFIG", str(explicit))
    assert load_config().path == explicit
    monkeypatch.delenv("LLMQ_CONFIG")
    monkeypatch.chdir(tmp_path)
    assert load_config().path == PACKAGED_CONFIG  # installed without the checkout
    assert PACKAGED_CONFIG.read_text() == (Path(__file__).resolve().parents[2] / "config" / "llm_service.yaml").read_text()
    monkeypatch.setattr("llmq.contract.config.PACKAGED_CONFIG", tmp_path / "not-shipped.yaml")
    with pytest.raises(ConfigError, match="no config file found: pass --config PATH, set LLMQ_CONFIG"):
        load_config()
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_the_shipped_config_loads_with_no_keys() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "config" / "llm_service.yaml")
    assert set(config.configured_providers()) == {"mock_primary", "mock_backup"}


ROUTING_CONFIG = """
llm_service:
  default_provider: openai
  fallback_chain: [openai, anthropic, local]
  context_fallbacks: {gpt-4: gpt-4-turbo}
  providers:
    openai: {api_key: "${OPENAI_API_KEY}", models: [gpt-4, gpt-4-turbo]}
    azure: {type: azure_openai, api_key: k, base_url: "http://azure", models: [gpt-4]}
    anthropic: {api_key: k, models: [claude-3-opus], stand_ins: {gpt-4: claude-3-opus}}
    local: {type: ollama, models: [llama3], default_model: llama3}
"""


def ask(model: str, provider: str | None = None) -> LLMRequest:
    return LLMRequest(messages=[{"role": "user", "content": "x"}], model=model, provider=provider)


def test_route_serving_providers_then_chain_with_stand_ins() -> None:
    config = parse_config(ROUTING_CONFIG, environ={"OPENAI_API_KEY": "sk"})
    assert plan_route(ask("gpt-4"), config) == [
        Hop(provider="openai", model="gpt-4"), Hop(provider="azure", model="gpt-4"),
        Hop(provider="anthropic", model="claude-3-opus"), Hop(provider="local", model="llama3"),
    ]


def test_route_skips_unconfigured_providers_and_honours_an_explicit_provider() -> None:
    config = parse_config(ROUTING_CONFIG, environ={})
    assert [hop.provider for hop in plan_route(ask("gpt-4"), config)] == ["azure", "anthropic", "local"]
    assert plan_route(ask("gpt-4", provider="azure"), config) == [Hop(provider="azure", model="gpt-4")]
    with pytest.raises(RoutingError, match="not configured .*OPENAI_API_KEY"):
        plan_route(ask("gpt-4", provider="openai"), config)
    with pytest.raises(RoutingError, match="is not in the config"):
        plan_route(ask("gpt-4", provider="nowhere"), config)


def test_route_refuses_a_model_nobody_serves() -> None:
    config = parse_config(ROUTING_CONFIG.replace("default_model: llama3", "enabled: true"), environ={})
    with pytest.raises(RoutingError, match="model 'mystery': no configured provider serves it"):
        plan_route(ask("mystery"), config)


def test_larger_context_hop() -> None:
    config = parse_config(ROUTING_CONFIG, environ={})
    assert larger_context_hop(Hop(provider="openai", model="gpt-4"), config) == Hop(provider="openai", model="gpt-4-turbo")
    assert larger_context_hop(Hop(provider="openai", model="gpt-4-turbo"), config) is None
