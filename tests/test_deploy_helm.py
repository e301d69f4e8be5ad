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

from service import metrics
from service.config import load_settings

ROOT: Final = Path(__file__).resolve().parent.parent
CHART: Final = ROOT / "deploy" / "helm" / "eva-ws"
ALL_FEATURES: Final = CHART / "ci" / "all-features-values.yaml"
RUNBOOK: Final = ROOT / "docs" / "operations.md"
DASHBOARD: Final = ROOT / "deploy" / "grafana" / "eva-ws.json"
# The Kubernetes release the bundled helm targets; kubernetes-validate ships its schemas.
KUBERNETES_VERSION: Final = "1.33.0"
RELEASE: Final = "eva"
FULLNAME: Final = "eva-eva-ws"
SECRET_SETTINGS: Final = frozenset({"EVA_WS_JWT_SECRET", "EVA_WS_JWT_PUBLIC_KEY", "EVA_WS_REDIS_URL"})
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
}


@pytest.mark.parametrize("case", sorted(UNSAFE_COMBINATIONS))
def test_chart_refuses_unsafe_combinations(helm: str, case: str) -> None:
    args, message = UNSAFE_COMBINATIONS[case]
    result = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert result.returncode != 0
    assert message in result.stderr


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
        "EVA_WS_REDIS_URL": ("eva-ws-keys", "redis-url"),
    }


def test_pod_id_is_the_pod_name(manifests: list[Manifest]) -> None:
    env = {e["name"]: e for e in container(manifests)["env"]}
    assert env["EVA_WS_POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_chart_runs_production_mode(manifests: list[Manifest]) -> None:
    assert configmap_data(manifests)["EVA_WS_MODE"] == "production"


def test_rendered_settings_pass_the_service_validation(manifests: list[Manifest]) -> None:
    env = dict(configmap_data(manifests))
    for entry in container(manifests)["env"]:
        if entry["name"] == "EVA_WS_JWT_PUBLIC_KEY":
            env[entry["name"]] = "-----BEGIN PUBLIC KEY-----\nplaceholder\n-----END PUBLIC KEY-----\n"
        elif entry["name"] == "EVA_WS_REDIS_URL":
            env[entry["name"]] = "redis://redis:6379/0"
        elif entry["name"].startswith("EVA_WS_"):
            env[entry["name"]] = "x" * 48
    settings = load_settings(env)
    assert settings.mode == "production"
    assert settings.ops_port == 9090
    assert settings.demo_enabled is False


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
    assert egress_ports == {53, 6379}


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


def exposed_metric_names() -> set[str]:
    """Names as Prometheus scrapes them (counters end in _total, histograms in _bucket/_sum/_count)."""
    names: set[str] = set()
    for family in metrics.REGISTRY.collect():
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def base_metric_names() -> set[str]:
    names = set()
    for family in metrics.REGISTRY.collect():
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
    ):
        assert f"`{event}`" in runbook
    for setting in ("EVA_WS_JWT_ALGORITHMS", "EVA_WS_JWT_SECRET", "EVA_WS_JWT_PUBLIC_KEY", "EVA_WS_DRAIN_SPREAD_S"):
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
