"""Settings: defaults, and a clear refusal for every bad value."""

from __future__ import annotations

import pytest

from service.config import ConfigError, load_settings

SECRET = "s" * 40


def test_defaults_in_production_with_a_secret():
    settings = load_settings({"EVA_WS_JWT_SECRET": SECRET})
    assert settings.mode == "production"
    assert settings.port == 8080
    assert settings.redis_url is None
    assert settings.send_queue_size == 256
    assert settings.jwt_algorithms == ("HS256",)
    assert not settings.demo_enabled
    assert (settings.broker_canary_interval_s, settings.broker_canary_max_lag_s) == (1.0, 5.0)
    assert settings.presence_ttl_s == 30.0
    assert settings.redis_reconnect_max_s == 5.0
    assert (settings.resume_events_per_user_s, settings.resume_events_per_user_burst) == (5000.0, 10_000)


def test_development_mints_its_own_secret_and_enables_the_demo():
    settings = load_settings({"EVA_WS_MODE": "development"})
    assert settings.jwt_secret is not None
    assert len(settings.jwt_secret) >= 32
    assert settings.demo_enabled


def test_lists_and_files_are_read(tmp_path):
    key = tmp_path / "secret"
    key.write_text(SECRET)
    settings = load_settings(
        {
            "EVA_WS_JWT_SECRET_FILE": str(key),
            "EVA_WS_ALLOWED_ORIGINS": "https://A.example.com, http://localhost:3000",
            "EVA_WS_JWT_ALGORITHMS": "HS256,HS512",
        }
    )
    assert settings.jwt_secret == SECRET
    assert settings.allowed_origins == ("https://a.example.com", "http://localhost:3000")
    assert settings.jwt_algorithms == ("HS256", "HS512")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "EVA_WS_JWT_SECRET (or EVA_WS_JWT_KEYS) is required in production"),
        ({"EVA_WS_JWT_SECRET": "short"}, "at least 32 bytes"),
        ({"EVA_WS_PORT": "http"}, "EVA_WS_PORT='http' is not an integer"),
        ({"EVA_WS_PORT": "70000"}, "between 0 and 65535"),
        ({"EVA_WS_MODE": "prod"}, "EVA_WS_MODE='prod'"),
        ({"EVA_WS_POTR": "8080"}, "unknown setting EVA_WS_POTR"),
        ({"EVA_WS_JWT_ALGORITHMS": "none"}, "never contain 'none'"),
        ({"EVA_WS_JWT_ALGORITHMS": "HS256,RS256"}, "mixes HMAC and public-key"),
        ({"EVA_WS_JWT_ALGORITHMS": "XX1"}, "unknown algorithm"),
        ({"EVA_WS_JWT_ALGORITHMS": "RS256"}, "EVA_WS_JWT_PUBLIC_KEY"),
        ({"EVA_WS_ALLOWED_ORIGINS": "evil.example"}, "not an origin"),
        ({"EVA_WS_ALLOWED_ORIGINS": "https://a.example.com/path"}, "not an origin"),
        ({"EVA_WS_HEARTBEAT_S": "nan"}, "between"),
        ({"EVA_WS_HEARTBEAT_S": "0"}, "between"),
        ({"EVA_WS_SEND_QUEUE_SIZE": "0"}, "between"),
        ({"EVA_WS_DEMO_PUBLISHER": "maybe"}, "not a boolean"),
        ({"EVA_WS_TLS_CERT": "/nonexistent"}, "TLS_CERT and EVA_WS_TLS_KEY"),
        ({"EVA_WS_TLS_CERT": "/nonexistent", "EVA_WS_TLS_KEY": "/nonexistent"}, "does not exist"),
        ({"EVA_WS_REDIS_URL": "http://redis"}, "must start with redis://"),
        ({"EVA_WS_LOG_LEVEL": "loud"}, "EVA_WS_LOG_LEVEL"),
        ({"EVA_WS_OPS_PORT": "8080"}, "must differ"),
        ({"EVA_WS_JWT_SECRET_FILE": "/nonexistent/secret"}, "cannot be read"),
        ({"EVA_WS_POD_ID": "pod\x00one"}, "printable"),
        (
            {"EVA_WS_BROKER_CANARY_INTERVAL_S": "2", "EVA_WS_BROKER_CANARY_MAX_LAG_S": "1"},
            "BROKER_CANARY_MAX_LAG_S must be longer than",
        ),
        ({"EVA_WS_PRESENCE_TTL_S": "0.5"}, "EVA_WS_PRESENCE_TTL_S=0.5 must be between"),
        ({"EVA_WS_REDIS_RECONNECT_MAX_S": "0"}, "between"),
        # A resume budget of nothing would refuse every resume for good; nan and inf would disable it.
        ({"EVA_WS_RESUME_EVENTS_PER_USER_S": "0"}, "EVA_WS_RESUME_EVENTS_PER_USER_S=0.0 must be between"),
        ({"EVA_WS_RESUME_EVENTS_PER_USER_S": "-5000"}, "RESUME_EVENTS_PER_USER_S=-5000.0 must be between"),
        ({"EVA_WS_RESUME_EVENTS_PER_USER_S": "nan"}, "RESUME_EVENTS_PER_USER_S=nan must be between"),
        ({"EVA_WS_RESUME_EVENTS_PER_USER_S": "inf"}, "RESUME_EVENTS_PER_USER_S=inf must be between"),
        ({"EVA_WS_RESUME_EVENTS_PER_USER_S": "lots"}, "RESUME_EVENTS_PER_USER_S='lots' is not a number"),
        ({"EVA_WS_RESUME_EVENTS_PER_USER_BURST": "0"}, "RESUME_EVENTS_PER_USER_BURST=0 must be between"),
        ({"EVA_WS_RESUME_EVENTS_PER_USER_BURST": "-1"}, "RESUME_EVENTS_PER_USER_BURST=-1 must be between"),
        ({"EVA_WS_RESUME_EVENTS_PER_USER_BURST": "1e4"}, "RESUME_EVENTS_PER_USER_BURST='1e4' is not an integer"),
        (
            {"EVA_WS_RESUME_EVENTS_PER_USER_BURST": "99999999999999999999"},
            "RESUME_EVENTS_PER_USER_BURST=99999999999999999999 must be between",
        ),
        ({"EVA_WS_RESUME_EVENTS_PER_USER": "5000"}, "unknown setting EVA_WS_RESUME_EVENTS_PER_USER"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(env, message):
    base = {} if any(k.startswith("EVA_WS_JWT_SECRET") for k in env) or env == {} else {"EVA_WS_JWT_SECRET": SECRET}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings({**base, **env})


def test_the_scripts_virtualenv_variable_is_not_refused_as_a_setting():
    # scripts/lib/common.sh reads EVA_WS_VENV; a user who exports it must still start the service.
    settings = load_settings({"EVA_WS_JWT_SECRET": "x" * 32, "EVA_WS_VENV": "/opt/venv"})
    assert settings.mode == "production"


def test_the_outbox_dsn_is_a_postgresql_url_kept_out_of_the_settings_repr() -> None:
    base = {"EVA_WS_JWT_SECRET": SECRET}
    with pytest.raises(ConfigError, match="EVA_WS_OUTBOX_DSN must be a postgresql:// URL"):
        load_settings({**base, "EVA_WS_OUTBOX_DSN": "mysql://db/app"})
    settings = load_settings({**base, "EVA_WS_OUTBOX_DSN": "postgresql://relay:hunter2@db:5432/app"})
    assert settings.outbox_dsn == "postgresql://relay:hunter2@db:5432/app"
    assert "hunter2" not in repr(settings)
