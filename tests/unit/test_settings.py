"""Settings: lazy, validated, and errors that name the setting."""

from __future__ import annotations

import pytest

from shared import settings as settings_module
from shared.errors import ConfigurationError
from shared.settings import SETTINGS, Settings, get_settings, reset_settings

TENANT = "11111111-2222-3333-4444-555555555555"
CLIENT = "66666666-7777-8888-9999-000000000000"
BASE = {
    "DATAVERSE_URL": "https://contoso.crm4.dynamics.com",
    "DATAVERSE_TENANT_ID": TENANT,
    "DATAVERSE_CLIENT_ID": CLIENT,
    "KEY_VAULT_URL": "https://contoso-kv.vault.azure.net/",
}


def test_defaults_and_derived_values() -> None:
    s = Settings.from_env(BASE)
    assert s.dataverse_url == "https://contoso.crm4.dynamics.com"
    assert s.key_vault_url == "https://contoso-kv.vault.azure.net"
    assert s.api_base == "https://contoso.crm4.dynamics.com/api/data/v9.2/"
    assert s.scope == "https://contoso.crm4.dynamics.com/.default"
    assert s.client_secret_name == "dataverse-client-secret"
    assert s.webhook_secret_name == "webhook-signing-secret"
    assert (s.timeout_seconds, s.max_retries, s.max_retry_seconds) == (30.0, 5, 300.0)
    assert (s.user_cache_ttl, s.user_cache_negative_ttl) == (900.0, 60.0)
    assert s.public_authority and s.authority_host == ""


@pytest.mark.parametrize(
    "name", ["DATAVERSE_URL", "DATAVERSE_TENANT_ID", "DATAVERSE_CLIENT_ID", "KEY_VAULT_URL"]
)
def test_missing_required_setting_is_named(name: str) -> None:
    env = {k: v for k, v in BASE.items() if k != name}
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env(env)
    assert info.value.code == "setting_missing"
    assert info.value.setting == name
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATAVERSE_URL", "http://contoso.crm.dynamics.com"),
        ("DATAVERSE_URL", "https://contoso.crm.dynamics.com/api/data/v9.2"),
        ("DATAVERSE_TENANT_ID", "contoso.onmicrosoft.com"),
        ("DATAVERSE_CLIENT_ID", "not-a-guid"),
        ("KEY_VAULT_URL", "contoso-kv"),
        ("DATAVERSE_API_VERSION", "9.2"),
        ("DATAVERSE_TIMEOUT_SECONDS", "soon"),
        ("DATAVERSE_TIMEOUT_SECONDS", "0"),
        ("DATAVERSE_TIMEOUT_SECONDS", "nan"),
        ("DATAVERSE_MAX_RETRY_SECONDS", "inf"),
        ("USER_CACHE_TTL_SECONDS", "-5"),
        ("DATAVERSE_MAX_RETRIES", "-1"),
        ("AZURE_AUTHORITY_HOST", "http://login.example"),
    ],
)
def test_malformed_setting_is_named(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({**BASE, name: value})
    assert info.value.code == "setting_invalid"
    assert info.value.setting == name


def test_private_authority_turns_instance_discovery_off() -> None:
    local = Settings.from_env({**BASE, "AZURE_AUTHORITY_HOST": "127.0.0.1:8443"})
    assert local.authority_host == "https://127.0.0.1:8443"
    assert not local.public_authority
    public = Settings.from_env({**BASE, "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.us"})
    assert public.public_authority


def test_settings_are_read_lazily_once_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    reset_settings()
    for name in BASE:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError):
        get_settings()  # nothing read at import; the first use names what is missing
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    first = get_settings()
    monkeypatch.setenv("DATAVERSE_URL", "https://other.crm.dynamics.com")
    assert get_settings() is first
    reset_settings()
    assert get_settings().dataverse_url == "https://other.crm.dynamics.com"
    reset_settings()
    assert settings_module._settings is None


def test_declared_names_are_unique_and_cover_what_is_read() -> None:
    names = [spec.name for spec in SETTINGS]
    assert len(names) == len(set(names))
    for name in BASE:
        assert name in names
