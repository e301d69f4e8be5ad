"""The Helm chart: lint, render, Kubernetes schemas, and the operational promises it makes."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service import metrics
from service.config import ENV_PREFIX, ConfigError, Settings, load_settings

ROOT: Final = Path(__file__).resolve().parent.parent
CHART: Final = ROOT / "deploy" / "helm" / "eva-ws"
ALL_FEATURES: Final = CHART / "ci" / "all-features-values.yaml"
RUNBOOK: Final = ROOT / "docs" / "operations.md"
DASHBOARD: Final = ROOT / "deploy" / "grafana" / "eva-ws.json"
# The Kubernetes release the bundled helm targets; kubernetes-validate ships its schemas.
KUBERNETES_VERSION: Final = "1.33.0"
RELEASE: Final = "eva"
FULLNAME: Final = "eva-eva-ws"
SECRET_SETTINGS: Final = frozenset(
    {"EVA_WS_JWT_SECRET", "EVA_WS_JWT_PUBLIC_KEY", "EVA_WS_JWT_KEYS", "EVA_WS_REDIS_URL"}
)
# Settings of the service that no values file makes the chart render, and why.
NOT_RENDERED: Final = {
    "EVA_WS_TLS_CERT": "TLS terminates at the ingress",
    "EVA_WS_TLS_KEY": "TLS terminates at the ingress",
    "EVA_WS_JWT_PRIVATE_KEY": "a signing key for `eva-ws token`; pods only verify",
    "EVA_WS_JWT_PRIVATE_KEY_FILE": "a signing key for `eva-ws token`; pods only verify",
    "EVA_WS_JWT_SECRET_FILE": "the secret comes from the Secret as an env var (secretKeyRef)",
    "EVA_WS_JWT_PUBLIC_KEY_FILE": "the key comes from the Secret as an env var (secretKeyRef)",
    "EVA_WS_JWT_KEYS_FILE": "the keys come from the Secret as an env var (secretKeyRef)",
    "EVA_WS_DEMO_INTERVAL_S": "the demo publisher is always off (EVA_WS_DEMO_PUBLISHER=false)",
}
ALERTS: Final = frozenset(
    {
        "EvaWsNoReadyPods",
        "EvaWsPodDeafToRedis",
        "EvaWsSlowConsumers",
        "EvaWsErrorRepliesHigh",
        "EvaWsInternalErrors",
        "EvaWsHandshakesRejected",
        "EvaWsPublishUnavailable",
    }
)

Manifest = dict[str, Any]


@pytest.fixture(scope="module")
def helm() -> str:
    configured = os.environ.get("EVA_WS_HELM")
    candidates = [Path(configured)] if configured else []
    candidates.append(ROOT / ".cache" / "helm" / "helm")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(
        "helm v4 is needed for the chart tests and was not found "
        f"(EVA_WS_HELM={configured!r}, {ROOT / '.cache/helm/helm'} missing). "
        "Run scripts/test: it fetches helm once into .cache/helm/ and exports EVA_WS_HELM."
    )


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, check=False, cwd=ROOT)


def render(helm: str, *args: str) -> list[Manifest]:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", "push", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(manifests: list[Manifest], kind: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(manifests: list[Manifest]) -> Manifest:
    containers = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["eva-ws"]
    result: Manifest = containers[0]
    return result


@pytest.fixture(scope="module")
def default_manifests(helm: str) -> list[Manifest]:
    return render(helm)


@pytest.fixture(scope="module")
def all_manifests(helm: str) -> list[Manifest]:
    return render(helm, "-f", str(ALL_FEATURES))


@pytest.fixture(params=["default", "all-features"])
def manifests(request: pytest.FixtureRequest, helm: str) -> list[Manifest]:
    return render(helm) if request.param == "default" else render(helm, "-f", str(ALL_FEATURES))


# --- lint and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["default", "all-features"])
def test_chart_lints_cleanly(helm: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_default_values_render_only_the_always_on_objects(default_manifests: list[Manifest]) -> None:
    kinds = sorted(m["kind"] for m in default_manifests)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]


def test_every_optional_object_renders_when_enabled(all_manifests: list[Manifest]) -> None:
    kinds = sorted(m["kind"] for m in all_manifests)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Ingress",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    ]


def test_rendered_objects_match_the_kubernetes_schemas(manifests: list[Manifest]) -> None:
    for manifest in manifests:
        if manifest["apiVersion"] == "monitoring.coreos.com/v1":
            # Prometheus Operator CRDs: kubernetes-validate has no schema for them; their
            # shape is checked by the ServiceMonitor and PrometheusRule tests below.
            continue
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_kubernetes_schema_validation_catches_a_broken_object(default_manifests: list[Manifest]) -> None:
    broken = json.loads(json.dumps(one(default_manifests, "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


BROKEN_VALUES: Final = {
    "replica count is not a number": ({"replicaCount": "three"}, "/replicaCount"),
    "unknown top-level key": ({"replicas": 3}, "replicas"),
    "unknown setting": ({"config": {"jwtSecret": "x" * 40}}, "jwtSecret"),
    "algorithm none": ({"config": {"jwtAlgorithms": ["none"]}}, "/config/jwtAlgorithms/0"),
    "negative drain": ({"config": {"drainSpreadS": -1}}, "/config/drainSpreadS"),
    "writable root filesystem": (
        {"containerSecurityContext": {"readOnlyRootFilesystem": False}},
        "readOnlyRootFilesystem",
    ),
    "root allowed": ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    "origin with a path": ({"config": {"allowedOrigins": ["https://app.example.com/ws"]}}, "/config/allowedOrigins/0"),
    "literal secret in extraEnv": (
        {"extraEnv": [{"name": "EVA_WS_JWT_SECRET", "value": "s" * 40}]},
        "/extraEnv/0/name",
    ),
    "literal key set in extraEnv": (
        {"extraEnv": [{"name": "EVA_WS_JWT_KEYS", "value": '{"k1": "x"}'}]},
        "/extraEnv/0/name",
    ),
    "literal outbox DSN in extraEnv": (
        {"extraEnv": [{"name": "EVA_WS_OUTBOX_DSN", "value": "postgresql://relay:pw@db/app"}]},
        "/extraEnv/0/name",
    ),
    "outbox batch above 10000": ({"outbox": {"batchSize": 10001}}, "/outbox/batchSize"),
    "outbox poll below 50 ms": ({"outbox": {"pollIntervalS": 0.01}}, "/outbox/pollIntervalS"),
    "canary interval below 50 ms": ({"config": {"brokerCanaryIntervalS": 0.01}}, "/config/brokerCanaryIntervalS"),
    "presence ttl below a second": ({"config": {"presenceTtlS": 0.5}}, "/config/presenceTtlS"),
    "negative per-ip cap": ({"config": {"maxConnectionsPerIp": -1}}, "/config/maxConnectionsPerIp"),
    "fractional per-user cap": ({"config": {"maxConnectionsPerUser": 2.5}}, "/config/maxConnectionsPerUser"),
    "handshake timeout too short": ({"config": {"handshakeTimeoutS": 0.1}}, "/config/handshakeTimeoutS"),
    "rebalance tolerance above 10": ({"config": {"rebalanceTolerance": 11}}, "/config/rebalanceTolerance"),
    "rebalance interval above an hour": ({"config": {"rebalanceIntervalS": 3601}}, "/config/rebalanceIntervalS"),
    "jwks over plain http": ({"config": {"jwksUrl": "http://idp.example.com/jwks"}}, "/config/jwksUrl"),
    "jwks max age above a week": ({"config": {"jwksMaxAgeS": 700000}}, "/config/jwksMaxAgeS"),
    "client ip header with a space": ({"config": {"clientIpHeader": "X Real IP"}}, "/config/clientIpHeader"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_VALUES))
def test_values_schema_rejects_broken_values(helm: str, tmp_path: Path, case: str) -> None:
    values, complaint = BROKEN_VALUES[case]
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    for command in (["lint", str(CHART)], ["template", RELEASE, str(CHART)]):
        result = run_helm(helm, *command, "-f", str(values_file))
        assert result.returncode != 0, f"helm {command[0]} accepted {values}"
        assert "schema" in result.stdout + result.stderr
        assert complaint in result.stdout + result.stderr


UNSAFE_COMBINATIONS: Final = {
    "ops port equals main port": (["--set", "config.opsPort=8080"], "config.opsPort must differ"),
    "embedded broker with several pods": (["--set", "redis.urlKey="], "redis.urlKey is empty"),
    "mixed algorithm families": (
        ["--set", "config.jwtAlgorithms={HS256,RS256}", "--set", "auth.jwtPublicKeyKey=pub"],
        "mixes HMAC",
    ),
    "public-key algorithm without a key": (["--set", "config.jwtAlgorithms={ES256}"], "auth.jwtPublicKeyKey"),
    "hmac without secret or key set": (["--set", "auth.jwtSecretKey="], "auth.jwtKeysKey"),
    "jwks with hmac": (["--set", "config.jwksUrl=https://idp.example.com/jwks"], "JWKS keys are public keys"),
    "canary lag not longer than the interval": (
        ["--set", "config.brokerCanaryIntervalS=2", "--set", "config.brokerCanaryMaxLagS=2"],
        "brokerCanaryMaxLagS must be longer",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_COMBINATIONS))
def test_chart_refuses_unsafe_combinations(helm: str, case: str) -> None:
    args, message = UNSAFE_COMBINATIONS[case]
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--set", "auth.jwtSecretKey=", "--set", "auth.jwtKeysKey=jwt-keys"],
        ["--set", "config.jwtAlgorithms={ES256}", "--set", "config.jwksUrl=https://idp.example.com/jwks"],
        ["--set", "config.jwtAlgorithms={ES256}", "--set", "auth.jwtSecretKey=", "--set", "auth.jwtKeysKey=k"],
    ],
    ids=["hmac key set only", "jwks only", "public key set only"],
)
def test_a_key_set_or_jwks_alone_is_enough_to_verify_tokens(helm: str, args: list[str]) -> None:
    settings = load_settings(pod_env(render(helm, *args)))
    assert settings.jwt_keys or settings.jwks_url


def test_embedded_broker_is_allowed_for_a_single_pod(helm: str) -> None:
    manifests = render(helm, "--set", "redis.urlKey=", "--set", "replicaCount=1")
    names = {e["name"] for e in container(manifests)["env"]}
    assert "EVA_WS_REDIS_URL" not in names


# --- what the pods promise --------------------------------------------------------------


def configmap_data(manifests: list[Manifest]) -> dict[str, str]:
    data: dict[str, str] = one(manifests, "ConfigMap")["data"]
    return data


def test_probes_use_healthz_and_readyz_on_the_ops_port(manifests: list[Manifest]) -> None:
    main = container(manifests)
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert ports == {"http": 8080, "ops": 9090}
    assert configmap_data(manifests)["EVA_WS_OPS_PORT"] == "9090"
    assert configmap_data(manifests)["EVA_WS_PORT"] == "8080"
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert main["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}


def test_grace_period_outlasts_prestop_and_drain(manifests: list[Manifest]) -> None:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    data = configmap_data(manifests)
    needed = float(pre_stop[1]) + float(data["EVA_WS_DRAIN_DELAY_S"]) + float(data["EVA_WS_DRAIN_SPREAD_S"])
    assert pod["terminationGracePeriodSeconds"] > needed


def test_pods_run_as_non_root_with_a_read_only_root(manifests: list[Manifest]) -> None:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = pod["containers"][0]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_no_secret_value_is_rendered(manifests: list[Manifest]) -> None:
    assert not [m for m in manifests if m["kind"] == "Secret"]
    assert not SECRET_SETTINGS & configmap_data(manifests).keys()
    env = {e["name"]: e for e in container(manifests)["env"]}
    secret_env = SECRET_SETTINGS & env.keys()
    assert "EVA_WS_REDIS_URL" in secret_env
    assert secret_env & {"EVA_WS_JWT_SECRET", "EVA_WS_JWT_PUBLIC_KEY"}
    for name in secret_env:
        assert "value" not in env[name]
        assert set(env[name]["valueFrom"]) == {"secretKeyRef"}


def test_secrets_come_from_the_existing_secret(
    default_manifests: list[Manifest], all_manifests: list[Manifest]
) -> None:
    def refs(manifests: list[Manifest]) -> dict[str, tuple[str, str]]:
        return {
            e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in container(manifests)["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }

    assert refs(default_manifests) == {
        "EVA_WS_JWT_SECRET": (FULLNAME, "EVA_WS_JWT_SECRET"),
        "EVA_WS_REDIS_URL": (FULLNAME, "EVA_WS_REDIS_URL"),
    }
    assert refs(all_manifests) == {
        "EVA_WS_JWT_PUBLIC_KEY": ("eva-ws-keys", "jwt-public-key.pem"),
        "EVA_WS_JWT_KEYS": ("eva-ws-keys", "jwt-keys.json"),
        "EVA_WS_REDIS_URL": ("eva-ws-keys", "redis-url"),
        "EVA_WS_OUTBOX_DSN": ("eva-ws-keys", "outbox-dsn"),
    }


def test_the_outbox_relay_is_off_by_default_and_its_settings_come_from_values(
    default_manifests: list[Manifest], all_manifests: list[Manifest]
) -> None:
    defaults = load_settings(pod_env(default_manifests))
    assert (defaults.outbox_dsn, defaults.outbox_batch_size, defaults.outbox_poll_interval_s) == (
        None,
        Settings().outbox_batch_size,
        Settings().outbox_poll_interval_s,
    )
    configured = load_settings(pod_env(all_manifests))
    assert (configured.outbox_dsn, configured.outbox_batch_size, configured.outbox_poll_interval_s) == (
        OUTBOX_DSN,
        200,
        0.5,
    )
    # The DSN holds a password: a secretKeyRef, never a ConfigMap value.
    assert "EVA_WS_OUTBOX_DSN" not in configmap_data(all_manifests)


def test_pod_id_is_the_pod_name(manifests: list[Manifest]) -> None:
    env = {e["name"]: e for e in container(manifests)["env"]}
    assert env["EVA_WS_POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_chart_runs_production_mode(manifests: list[Manifest]) -> None:
    assert configmap_data(manifests)["EVA_WS_MODE"] == "production"


def public_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


OUTBOX_DSN: Final = "postgresql://eva_ws_relay:password@postgres:5432/app"


def pod_env(manifests: list[Manifest]) -> dict[str, str]:
    """The EVA_WS_* environment a pod gets, with dummy values for what the Secret and the pod supply."""
    env = dict(configmap_data(manifests))
    hmac = env["EVA_WS_JWT_ALGORITHMS"].startswith("HS")
    for entry in container(manifests)["env"]:
        name = entry["name"]
        if name == "EVA_WS_JWT_PUBLIC_KEY":
            env[name] = public_key_pem()
        elif name == "EVA_WS_JWT_KEYS":
            keys = {"2026-11": "x" * 48, "2026-12": "y" * 48} if hmac else {"2026-11": public_key_pem()}
            env[name] = json.dumps(keys)
        elif name == "EVA_WS_REDIS_URL":
            env[name] = "redis://redis:6379/0"
        elif name == "EVA_WS_OUTBOX_DSN":
            env[name] = OUTBOX_DSN
        elif name == "EVA_WS_POD_ID":
            env[name] = "eva-eva-ws-7d9f-abcde"
        elif name.startswith("EVA_WS_"):
            env[name] = "x" * 48
    return env


def test_rendered_settings_pass_the_service_validation(manifests: list[Manifest]) -> None:
    settings = load_settings(pod_env(manifests))
    assert settings.mode == "production"
    assert settings.ops_port == 9090
    assert settings.demo_enabled is False


# values.yaml `config.<key>` -> the Settings field it sets.
CONFIG_FIELDS: Final = {
    "redisReconnectMaxS": "redis_reconnect_max_s",
    "brokerCanaryIntervalS": "broker_canary_interval_s",
    "brokerCanaryMaxLagS": "broker_canary_max_lag_s",
    "presenceTtlS": "presence_ttl_s",
    "jwksCooldownS": "jwks_cooldown_s",
    "jwksMaxAgeS": "jwks_max_age_s",
    "resumeEventsPerUserS": "resume_events_per_user_s",
    "resumeEventsPerUserBurst": "resume_events_per_user_burst",
    "maxConnectionsPerUser": "max_connections_per_user",
    "maxConnectionsPerIp": "max_connections_per_ip",
    "handshakeTimeoutS": "handshake_timeout_s",
    "rebalanceIntervalS": "rebalance_interval_s",
    "rebalanceTolerance": "rebalance_tolerance",
    "rebalanceMaxShedPerInterval": "rebalance_max_shed_per_interval",
}


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["default", "all-features"])
def test_the_pods_get_the_settings_the_values_ask_for(helm: str, values: Path | None) -> None:
    chart = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    if values is not None:
        chart |= yaml.safe_load(values.read_text())["config"]
    settings = load_settings(pod_env(render(helm, *(["-f", str(values)] if values else []))))
    for key, field in CONFIG_FIELDS.items():
        assert getattr(settings, field) == chart[key], key
    assert settings.jwks_url == (chart["jwksUrl"] or None)
    assert settings.client_ip_header == (chart["clientIpHeader"] or None)


def test_default_values_keep_the_service_defaults_for_the_newer_settings(default_manifests: list[Manifest]) -> None:
    settings = load_settings(pod_env(default_manifests))
    defaults = Settings()
    for field in CONFIG_FIELDS.values():
        assert getattr(settings, field) == getattr(defaults, field), field
    assert settings.rebalance_interval_s == 0
    assert settings.client_ip_header is None
    assert settings.jwt_keys == ()


def test_all_features_pods_verify_with_the_key_set_and_the_jwks(all_manifests: list[Manifest]) -> None:
    settings = load_settings(pod_env(all_manifests))
    assert [kid for kid, _ in settings.jwt_keys] == ["2026-11"]
    assert settings.jwks_url == "https://auth.example.com/.well-known/jwks.json"
    assert settings.rebalance_interval_s > 0
    assert settings.client_ip_header == "X-Real-IP"


def accepted_by_the_service(name: str) -> bool:
    try:
        load_settings({name: "/nonexistent", "EVA_WS_MODE": "development"})
    except ConfigError as error:
        return not str(error).startswith("unknown setting")
    return True


def service_setting_names() -> set[str]:
    """Every EVA_WS_* variable the service reads: one per Settings field, plus the _FILE variants it accepts."""
    names = {ENV_PREFIX + field.upper() for field in Settings.__dataclass_fields__}
    return names | {f"{name}_FILE" for name in names if accepted_by_the_service(f"{name}_FILE")}


def rendered_setting_names(manifests: list[Manifest]) -> set[str]:
    names = set(configmap_data(manifests)) | {e["name"] for e in container(manifests)["env"]}
    return {name for name in names if name.startswith(ENV_PREFIX)}


def test_service_setting_names_include_the_file_variants() -> None:
    names = service_setting_names()
    assert {"EVA_WS_JWT_SECRET_FILE", "EVA_WS_JWT_KEYS_FILE", "EVA_WS_JWT_PUBLIC_KEY_FILE"} <= names
    assert "EVA_WS_PORT_FILE" not in names


def test_every_service_setting_is_rendered_or_deliberately_left_out(
    default_manifests: list[Manifest], all_manifests: list[Manifest]
) -> None:
    # HMAC (the default) and public-key settings (all-features) exclude each other: the union
    # of both renders is what the chart can give a pod.
    rendered = rendered_setting_names(default_manifests) | rendered_setting_names(all_manifests)
    known = service_setting_names()
    assert rendered - known == set(), "the chart renders settings the service does not know"
    assert known - rendered - set(NOT_RENDERED) == set(), "settings neither rendered nor listed in NOT_RENDERED"
    assert rendered & set(NOT_RENDERED) == set(), "NOT_RENDERED lists settings the chart renders"
    readme = (CHART / "README.md").read_text()
    for name in NOT_RENDERED:
        assert f"`{name}" in readme, f"{name} is left out without a word in the chart README"


def test_config_change_rolls_the_pods(helm: str, default_manifests: list[Manifest]) -> None:
    def checksum(manifests: list[Manifest]) -> str:
        value: str = one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    assert re.fullmatch(r"[0-9a-f]{64}", checksum(default_manifests))
    assert checksum(render(helm)) == checksum(default_manifests)
    assert checksum(render(helm, "--set", "config.logLevel=debug")) != checksum(default_manifests)


def test_pods_spread_over_zones_and_nodes(manifests: list[Manifest]) -> None:
    deployment = one(manifests, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    constraints = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in constraints:
        assert constraint["labelSelector"] == {"matchLabels": selector}


def test_autoscaler_owns_the_replica_count(default_manifests: list[Manifest], all_manifests: list[Manifest]) -> None:
    assert one(default_manifests, "Deployment")["spec"]["replicas"] == 3
    assert "replicas" not in one(all_manifests, "Deployment")["spec"]
    hpa = one(all_manifests, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]


def test_service_exposes_http_and_ops(default_manifests: list[Manifest]) -> None:
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in one(default_manifests, "Service")["spec"]["ports"]}
    assert ports == {"http": (8080, "http"), "ops": (9090, "ops")}


# --- ingress, monitoring, network ---------------------------------------------------------


def test_ingress_hashes_on_customer_id_with_long_timeouts(all_manifests: list[Manifest]) -> None:
    ingress = one(all_manifests, "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$arg_customerId"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert annotations["cert-manager.io/cluster-issuer"] == "letsencrypt"
    assert ingress["spec"]["ingressClassName"] == "nginx"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": FULLNAME, "port": {"name": "http"}}


def test_service_monitor_scrapes_metrics_on_the_ops_port(all_manifests: list[Manifest]) -> None:
    monitor = one(all_manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"] == one(all_manifests, "Service")["spec"]["selector"]
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "ops"
    assert endpoint["path"] == "/metrics"


def alert_rules(manifests: list[Manifest]) -> dict[str, Manifest]:
    rule = one(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    [group] = rule["spec"]["groups"]
    return {r["alert"]: r for r in group["rules"]}


def test_prometheus_rule_has_the_documented_alerts(all_manifests: list[Manifest]) -> None:
    rules = alert_rules(all_manifests)
    assert set(rules) == ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert re.fullmatch(r"\d+m", rule["for"]), name
        assert rule["annotations"]["summary"], name
        assert "{{" not in rule["expr"], name
    assert "eva_ws_broker_ready" in rules["EvaWsPodDeafToRedis"]["expr"]
    assert "eva_ws_broker_subscriptions_wanted" in rules["EvaWsPodDeafToRedis"]["expr"]
    assert 'reason="slow_consumer"' in rules["EvaWsSlowConsumers"]["expr"]
    assert (
        'eva_ws_errors_total{namespace="push",job="eva-eva-ws",code!="token_expiring"}'
        in rules["EvaWsErrorRepliesHigh"]["expr"]
    )
    assert "eva_ws_handshakes_rejected_total" in rules["EvaWsHandshakesRejected"]["expr"]
    assert f'job="{FULLNAME}"' in rules["EvaWsSlowConsumers"]["expr"]
    # Prometheus templates in annotations survive helm's own templating.
    assert "{{ $labels.pod }}" in rules["EvaWsPodDeafToRedis"]["annotations"]["summary"]


def test_alert_expressions_name_only_declared_metrics(all_manifests: list[Manifest]) -> None:
    declared = exposed_metric_names()
    for name, rule in alert_rules(all_manifests).items():
        for used in re.findall(r"\beva_ws_[a-z_]+", rule["expr"]):
            assert used in declared, f"{name} uses undeclared metric {used}"


def test_network_policy_allows_clients_metrics_dns_and_redis(all_manifests: list[Manifest]) -> None:
    policy = one(all_manifests, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = [rule["ports"][0]["port"] for rule in policy["ingress"]]
    assert ingress_ports == ["http", "ops"]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    # 443 is the JWKS endpoint, allowed through networkPolicy.extraEgress in the all-features values.
    assert egress_ports == {53, 6379, 443}
    [jwks] = [rule for rule in policy["egress"] if rule["ports"][0]["port"] == 443]
    assert jwks["to"] == [{"ipBlock": {"cidr": "203.0.113.0/24"}}]


# --- documentation ------------------------------------------------------------------------


def value_paths(node: Any, prefix: str = "") -> Iterator[str]:
    """Leaf paths of values.yaml; empty maps and lists count as leaves."""
    if isinstance(node, dict) and node:
        for key, child in node.items():
            yield from value_paths(child, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


def test_every_value_is_documented_with_a_param_line() -> None:
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*## @param (\S+)", text, re.MULTILINE))
    paths = set(value_paths(yaml.safe_load(text)))
    assert paths - documented == set(), "values without ## @param"
    assert documented - paths == set(), "## @param lines for values that do not exist"


def test_values_schema_describes_every_top_level_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["additionalProperties"] is False
    assert set(values) <= set(schema["properties"])


def test_chart_readme_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    params = re.findall(r"^\s*## @param (\S+)", (CHART / "values.yaml").read_text(), re.MULTILINE)
    missing = [p for p in params if f"`{p}`" not in readme]
    assert missing == []
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path, default in re.findall(r"^\| `([\w.]+)` \| .* \| `(.*)` \|$", readme, re.MULTILINE):
        node = values
        for part in path.split("."):
            node = node[part]
        assert json.loads(default) == node, f"README default of {path} differs from values.yaml"
    for topic in ("helm install", "existingSecret", "redis+cluster://", "Gateway API", "upstream-hash-by"):
        assert topic in readme


def _own_families() -> list[Any]:
    """eva-ws's metrics, without the standard process_* ones the registry also exports."""
    return [family for family in metrics.REGISTRY.collect() if family.name.startswith(f"{metrics.NAMESPACE}_")]


def exposed_metric_names() -> set[str]:
    """Names as Prometheus scrapes them (counters end in _total, histograms in _bucket/_sum/_count)."""
    names: set[str] = set()
    for family in _own_families():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def base_metric_names() -> set[str]:
    names = set()
    for family in _own_families():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def test_runbook_explains_every_metric_alert_and_log_event() -> None:
    runbook = RUNBOOK.read_text()
    assert base_metric_names() - set(re.findall(r"eva_ws_[a-z_]+", runbook)) == set()
    for alert in ALERTS:
        assert f"### {alert}" in runbook
    for event in (
        "connection_opened",
        "connection_closed",
        "slow_consumer_closed",
        "handshake_rejected",
        "broker_connected",
        "broker_disconnected",
        "broker_deaf",
        "broker_recovered",
        "publish_failed",
        "drain_started",
        "drain_finished",
        "config_invalid",
        "jwks_fetch_failed",
        "rebalance_shedding",
    ):
        assert f"`{event}`" in runbook
    for setting in (
        "EVA_WS_JWT_ALGORITHMS",
        "EVA_WS_JWT_SECRET",
        "EVA_WS_JWT_PUBLIC_KEY",
        "EVA_WS_JWT_KEYS",
        "EVA_WS_JWKS_URL",
        "EVA_WS_DRAIN_SPREAD_S",
        "EVA_WS_BROKER_CANARY_MAX_LAG_S",
        "EVA_WS_REBALANCE_INTERVAL_S",
        "EVA_WS_MAX_CONNECTIONS_PER_IP",
        "EVA_WS_CLIENT_IP_HEADER",
    ):
        assert setting in runbook


def test_grafana_dashboard_charts_every_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    used = set(re.findall(r"eva_ws_[a-z_]+", " ".join(exprs)))
    declared = exposed_metric_names()
    assert used <= declared, f"unknown metrics {used - declared}"
    charted = {n.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count") for n in used}
    assert base_metric_names() - charted == set()
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "namespace", "job"}
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
