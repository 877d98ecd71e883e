"""typhon.config: defaults, where the file is found, TYPHON_* overrides, validation, masking."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from typhon.config import CATEGORIES, TyphonConfig, find_config_file, load_config, masked
from typhon.errors import ConfigError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def user_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A fake $HOME, so the developer's ~/.config/typhon/typhon.yaml is never read."""
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def _load_error(path: Path | None = None, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    return info.value


# -- defaults --------------------------------------------------------------------------------------


def test_defaults_are_the_embedded_setup(user_home: Path, home: Path) -> None:
    cfg = load_config(environ={})

    assert cfg.source is None
    assert cfg.home == home  # TYPHON_HOME, set by the autouse fixture
    assert cfg.database_url is None
    assert cfg.effective_database_url == f"sqlite:///{home / 'typhon.db'}"
    assert cfg.broker_url is None
    assert [m.model_name for m in cfg.models] == ["local"]
    assert cfg.models[0].litellm_params.provider == "local"
    assert cfg.routing == dict.fromkeys(CATEGORIES, "local")
    assert [(p.name, p.cap) for p in cfg.pools] == [
        ("research", 4),
        ("development", 2),
        ("creative", 2),
        ("monitoring", 4),
    ]
    assert all(p.queue == p.name for p in cfg.pools)


def test_effective_database_url_prefers_the_configured_one(home: Path) -> None:
    cfg = TyphonConfig(home=home, database_url="postgresql://u@db.example/typhon")
    assert cfg.effective_database_url == "postgresql://u@db.example/typhon"


def test_unknown_model_and_pool_lookups_are_config_errors(config: TyphonConfig) -> None:
    assert config.model("local").model_name == "local"
    assert config.pool("research").cap == 4
    with pytest.raises(ConfigError, match="nope"):
        config.model("nope")
    with pytest.raises(ConfigError, match="nope"):
        config.pool("nope")


# -- discovery -------------------------------------------------------------------------------------


def _config_with_level(path: Path, level: str) -> Path:
    return _write(path, f"log_level: {level}\n")


def test_discovery_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, user_home: Path) -> None:
    explicit = _config_with_level(tmp_path / "explicit.yaml", "error")
    from_env = _config_with_level(tmp_path / "env" / "typhon.yaml", "warning")
    cwd_file = _config_with_level(tmp_path / "typhon.yaml", "debug")  # cwd is tmp_path
    home_file = _config_with_level(user_home / ".config" / "typhon" / "typhon.yaml", "info")
    monkeypatch.setenv("TYPHON_CONFIG", str(from_env))

    # 1. explicit path beats everything
    cfg = load_config(explicit, environ={})
    assert (cfg.log_level, cfg.source) == ("error", str(explicit))
    # 2. $TYPHON_CONFIG beats ./typhon.yaml
    assert find_config_file() == from_env
    assert load_config().log_level == "warning"
    assert load_config(environ={"TYPHON_CONFIG": str(from_env)}).log_level == "warning"
    assert load_config(environ={}).log_level == "debug"  # environ= is the whole environment
    # 3. ./typhon.yaml beats the home file
    monkeypatch.delenv("TYPHON_CONFIG")
    assert find_config_file() == Path("typhon.yaml")
    assert load_config(environ={}).log_level == "debug"
    # 4. ~/.config/typhon/typhon.yaml
    cwd_file.unlink()
    assert find_config_file() == home_file
    cfg = load_config(environ={})
    assert cfg.source == str(home_file)
    # 5. nothing: defaults
    home_file.unlink()
    assert find_config_file() is None
    assert load_config(environ={}).source is None


def test_explicit_missing_path_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    err = _load_error(missing)
    assert str(missing) in str(err)
    assert err.exit_code == 2


def test_typhon_config_pointing_nowhere_is_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TYPHON_CONFIG", str(tmp_path / "gone.yaml"))
    with pytest.raises(ConfigError, match="TYPHON_CONFIG"):
        find_config_file()


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.yaml", "")
    cfg = load_config(path, environ={})
    assert cfg.source == str(path)
    assert [m.model_name for m in cfg.models] == ["local"]


def test_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "list.yaml", "- a\n- b\n")
    err = _load_error(path)
    assert str(path) in str(err)


def test_malformed_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.yaml", "pools: [unclosed\n")
    err = _load_error(path)
    assert err.source == str(path)


# -- TYPHON_* overrides ----------------------------------------------------------------------------


def test_environment_overrides_top_level_settings(user_home: Path) -> None:
    cfg = load_config(
        environ={
            "TYPHON_BROKER_URL": "redis://127.0.0.1:6379/0",
            "TYPHON_DATABASE_URL": "postgresql://typhon@127.0.0.1/typhon",
            "TYPHON_LOG_LEVEL": "debug",
            "UNRELATED": "x",
        }
    )
    assert cfg.broker_url == "redis://127.0.0.1:6379/0"
    assert cfg.database_url == "postgresql://typhon@127.0.0.1/typhon"
    assert cfg.effective_database_url == "postgresql://typhon@127.0.0.1/typhon"
    assert cfg.log_level == "debug"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        """
        broker_url: redis://127.0.0.1:6379/0
        log_level: warning
        """,
    )
    cfg = load_config(path, environ={"TYPHON_LOG_LEVEL": "error"})
    assert cfg.log_level == "error"
    assert cfg.broker_url == "redis://127.0.0.1:6379/0"


def test_nested_override_with_double_underscore(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        """
        model_list:
          - model_name: local
            litellm_params: {model: local/gemma-3-270m}
          - model_name: llama-7b
            litellm_params: {model: openai/llama-7b, api_base: "http://127.0.0.1:8000/v1"}
        routing: {simple: local, complex: local, code: local, creative: local}
        crews:
          research: {timeout_s: 60, max_tokens: 256}
        """,
    )
    cfg = load_config(
        path,
        environ={
            "TYPHON_ROUTING__SIMPLE": "llama-7b",
            "TYPHON_CREWS__RESEARCH__TIMEOUT_S": "120",
        },
    )
    assert cfg.routing["simple"] == "llama-7b"
    assert cfg.routing["complex"] == "local"  # the rest of the mapping is kept
    research = cfg.crew_settings("research")
    assert research.timeout_s == 120
    assert isinstance(research.timeout_s, float)
    assert research.max_tokens == 256  # merged, not replaced
    assert cfg.source == str(path)


def test_env_value_is_read_as_a_yaml_scalar(user_home: Path) -> None:
    cfg = load_config(environ={"TYPHON_CREWS__RESEARCH__MAX_TOKENS": "1024"})
    assert cfg.crew_settings("research").max_tokens == 1024
    assert cfg.crew_settings("other").max_tokens == 512  # defaults for unnamed crews


def test_nested_env_override_keeps_the_other_default_routes(user_home: Path) -> None:
    """``TYPHON_ROUTING__SIMPLE`` changes one route; the other categories must stay routed."""
    cfg = load_config(environ={"TYPHON_ROUTING__SIMPLE": "local"})
    assert set(cfg.routing) == set(CATEGORIES)


def test_env_override_with_a_bad_value_names_the_key(user_home: Path) -> None:
    err = _load_error(environ={"TYPHON_CREWS__RESEARCH__TIMEOUT_S": "soon"})
    assert err.key == "crews.research.timeout_s"
    assert "TYPHON_* variables" in str(err)


def test_env_value_that_is_not_yaml_is_a_config_error(user_home: Path) -> None:
    err = _load_error(environ={"TYPHON_ROUTING__SIMPLE": "[unclosed"})
    assert err.exit_code == 2


def test_typhon_config_and_unknown_variables_are_not_settings(user_home: Path) -> None:
    cfg = load_config(environ={"TYPHON_CONFIG": "", "TYPHON_SOMETHING_ELSE": "1"})
    assert cfg.source is None


# -- validation errors -----------------------------------------------------------------------------


def test_unknown_top_level_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "typhon.yaml", "brokr_url: redis://127.0.0.1/0\n")
    err = _load_error(path)
    assert err.key == "brokr_url"
    assert err.source == str(path)
    assert str(path) in str(err)
    assert "brokr_url" in str(err)
    assert err.exit_code == 2


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ('broker_url: "not a url"\n', "broker_url"),
        ("broker_url: http://127.0.0.1:6379/0\n", "broker_url"),
        ('database_url: "mysql://u@h/db"\n', "database_url"),
        ('database_url: "postgresql:///nohost"\n', "database_url"),
        ('search_url: "ftp://127.0.0.1"\n', "search_url"),
    ],
)
def test_bad_url_names_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = _write(tmp_path / "typhon.yaml", yaml_text)
    err = _load_error(path)
    assert err.key == key
    assert key in str(err)


def test_bad_api_base_names_the_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        """
        models:
          - model_name: local
            litellm_params: {model: openai/x, api_base: "ftp://x"}
        """,
    )
    err = _load_error(path)
    assert err.key == "models.0.litellm_params.api_base"
    assert "ftp://x" in str(err)


def test_good_urls_are_accepted(home: Path) -> None:
    cfg = TyphonConfig(
        home=home,
        broker_url="redis://127.0.0.1:6379/0",
        database_url="sqlite:////tmp/x.db",
        search_url="https://127.0.0.1:8080",
    )
    assert cfg.database_url == "sqlite:////tmp/x.db"
    TyphonConfig(home=home, database_url="postgresql+psycopg://u:p@127.0.0.1:5432/db")


def test_pool_cap_zero_names_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "typhon.yaml", "pools:\n  - {name: research, cap: 0}\n")
    err = _load_error(path)
    assert err.key == "pools.0.cap"
    assert "pools.0.cap" in str(err)


def test_pool_queue_defaults_to_its_name_and_cpuset_is_checked(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        """
        pools:
          - {name: research, cap: 4, cpuset: "28-35,44"}
          - {name: dev, cap: 2, queue: development}
        """,
    )
    cfg = load_config(path, environ={})
    assert cfg.pool("research").queue == "research"
    assert cfg.pool("research").cpuset == "28-35,44"
    assert cfg.pool("dev").queue == "development"


@pytest.mark.parametrize("cpuset", ["28-", "a-b", "35-28", "1,,2"])
def test_invalid_cpuset_is_refused(tmp_path: Path, cpuset: str) -> None:
    path = _write(
        tmp_path / "typhon.yaml", f'pools:\n  - {{name: r, cap: 1, cpuset: "{cpuset}"}}\n'
    )
    err = _load_error(path)
    assert err.key == "pools.0.cpuset"


def test_duplicate_pool_names_are_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        "pools:\n  - {name: research, cap: 1}\n  - {name: research, cap: 2}\n",
    )
    assert "unique" in str(_load_error(path))


def test_routing_to_unknown_alias_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "typhon.yaml", "routing: {simple: llama-70b}\n")
    err = _load_error(path)
    assert "routing.simple" in str(err)
    assert "llama-70b" in str(err)


def test_routing_to_unknown_category_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "typhon.yaml", "routing: {poetry: local}\n")
    err = _load_error(path)
    assert err.key is not None
    assert "poetry" in err.key


def test_crew_with_unknown_model_or_pool_is_refused(tmp_path: Path) -> None:
    bad_model = _write(tmp_path / "a.yaml", "crews:\n  research: {model: gpt-9}\n")
    assert "gpt-9" in str(_load_error(bad_model))
    bad_pool = _write(tmp_path / "b.yaml", "crews:\n  research: {pool: gpu}\n")
    assert "gpu" in str(_load_error(bad_pool))


def test_model_list_alias_and_extra_litellm_params(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        """
        model_list:
          - model_name: llama-7b
            litellm_params:
              model: ollama/qwen2.5:7b
              api_base: http://127.0.0.1:11434
              rpm: 60
              api_key: sk-test
            model_info: {max_tokens: 2048, custom_field: yes}
        routing: {simple: llama-7b, complex: llama-7b, code: llama-7b, creative: llama-7b}
        """,
    )
    cfg = load_config(path, environ={})
    entry = cfg.model("llama-7b")
    params = entry.litellm_params
    assert (params.provider, params.model_id) == ("ollama", "qwen2.5:7b")
    assert params.model_extra == {"rpm": 60}
    assert params.model_dump()["rpm"] == 60
    assert entry.model_info.max_tokens == 2048
    assert cfg.routing["code"] == "llama-7b"


def test_models_key_works_too(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        """
        models:
          - model_name: local
            litellm_params: {model: local/gemma-3-270m, threads: 2}
        """,
    )
    assert load_config(path, environ={}).model("local").litellm_params.threads == 2


def test_openai_entry_without_api_base_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        """
        model_list:
          - model_name: local
            litellm_params: {model: openai/default}
        """,
    )
    err = _load_error(path)
    assert "api_base" in str(err)
    assert "local" in str(err)


def test_model_without_provider_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        """
        model_list:
          - model_name: local
            litellm_params: {model: gemma, api_base: "http://127.0.0.1:1"}
        """,
    )
    err = _load_error(path)
    assert err.key == "model_list.0.litellm_params.model"


def test_unknown_key_inside_a_model_entry_is_refused(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "typhon.yaml",
        """
        model_list:
          - model_name: local
            litellm_params: {model: local/gemma-3-270m}
            speed: fast
        """,
    )
    err = _load_error(path)
    assert err.key == "model_list.0.speed"


def test_config_is_frozen(config: TyphonConfig) -> None:
    with pytest.raises(ValueError):
        config.broker_url = "redis://127.0.0.1/0"  # type: ignore[misc]


def test_config_error_exit_code_and_attributes() -> None:
    err = ConfigError("bad", source="f.yaml", key="pools.0.cap")
    assert err.exit_code == 2
    assert (err.source, err.key) == ("f.yaml", "pools.0.cap")
    assert str(err) == "f.yaml, key 'pools.0.cap': bad"
    assert str(ConfigError("plain")) == "plain"


# -- masking ---------------------------------------------------------------------------------------


def test_masked_hides_api_keys_and_url_passwords() -> None:
    dump = {
        "database_url": "postgresql://u:secret@db.example:5432/typhon",
        "broker_url": "redis://:hunter2@127.0.0.1:6379/0",
        "search_url": "http://127.0.0.1:8080",
        "model_list": [
            {
                "model_name": "big",
                "litellm_params": {
                    "model": "openai/big",
                    "api_base": "http://127.0.0.1:5000/v1",
                    "api_key": "sk-live-123",
                    "max_tokens": 10,
                },
            },
            {"model_name": "none", "litellm_params": {"api_key": None}},
        ],
        "router_settings": {"redis_password": "pw1", "auth_token": "tk1"},
    }
    out = masked(dump)
    text = repr(out)
    for secret in ("secret", "hunter2", "sk-live-123", "pw1", "tk1"):
        assert secret not in text
    assert out["database_url"] == "postgresql://u:***@db.example:5432/typhon"
    assert out["search_url"] == "http://127.0.0.1:8080"
    params = out["model_list"][0]["litellm_params"]
    assert params["api_key"] == "***"
    assert params["api_base"] == "http://127.0.0.1:5000/v1"
    assert params["max_tokens"] == 10
    assert out["model_list"][1]["litellm_params"]["api_key"] is None
    assert dump["database_url"].count("secret") == 1  # the input is not changed


def test_masked_config_dump(home: Path) -> None:
    cfg = TyphonConfig(home=home, database_url="postgresql://u:secret@127.0.0.1/db")
    assert "secret" not in repr(masked(cfg.model_dump(mode="json")))
