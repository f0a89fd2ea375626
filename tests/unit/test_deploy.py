"""Static checks of deploy/: alert rules (promtool), the dashboard's freshness, the Helm chart
rendered into manifests that agree with what the gateway reads, the Dockerfile and compose file.
(No Docker engine or Helm binary exists here: the chart is rendered by the small Go-template
renderer below, which implements exactly the template features the chart uses.)"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "moat"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


# ------------------------------------------------------------------------------------ rules
def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", "rules.yaml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests_pass_and_cover_every_alert_both_ways() -> None:
    result = _promtool("test", "rules", "rules_test.yaml", cwd=DEPLOY / "prometheus")
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus/rules.yaml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    cases = [c for t in yaml.safe_load((DEPLOY / "prometheus/rules_test.yaml").read_text())["tests"]
             for c in t["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts == fired == quiet


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    runbook = (DEPLOY / "RUNBOOK.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    for group in yaml.safe_load((DEPLOY / "prometheus/rules.yaml").read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            anchor = rule["annotations"]["runbook_url"].split("#")[1]
            assert anchor in anchors, (rule["alert"], anchor)
    for command in ("moat clients show", "moat clients unblock", "moat evidence export", "moat alerts"):
        assert command in runbook


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == ["moat"]
    config["rule_files"] = [str(DEPLOY / "prometheus/rules.yaml")]  # the container path, here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------- dashboard
def test_dashboard_is_generated_and_fresh() -> None:
    result = subprocess.run([sys.executable, str(DEPLOY / "grafana/dashboard.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads((DEPLOY / "grafana/moat.json").read_text())
    titles = " ".join(p["title"].lower() for p in data["panels"])
    for topic in ("request rate", "error", "latency", "extraction alerts", "flagged", "coverage",
                  "suspicion", "defense actions", "watermarks", "upstream"):
        assert topic in titles, topic
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_only_use_exported_metrics() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.metrics import GatewayMetrics

    registry = CollectorRegistry()
    GatewayMetrics(registry, ["m"])
    # Labelled metrics have no samples until first used: derive the exported names from the types.
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}
    names |= {"up"}
    data = json.loads((DEPLOY / "grafana/moat.json").read_text())
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            used = set(re.findall(r"\b(moat_[a-z_]+|up)\b(?=\{|\)|\[| )", target["expr"]))
            assert used and used <= names, (panel["title"], used - names)


# ------------------------------------------------------------------------------------- helm
class GoTemplate:
    """The subset of Go text/template + Helm functions the chart uses: actions with ``{{-``/``-}}``
    trimming, if/else/end, define/include, pipelines, and quote, toYaml, nindent, indent, b64enc,
    default, required, printf, trunc, trimSuffix, eq, ne, not, and, or, .Files.Get."""

    TOKEN = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)

    def __init__(self, chart: Path, values: dict, release: str = "prod") -> None:
        self.chart = chart
        self.defines: dict[str, list] = {}
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        self.root = {"Values": values, "Release": {"Name": release, "Namespace": "default", "Service": "Helm"},
                     "Chart": {"Name": meta["name"], "AppVersion": meta["appVersion"], "Version": meta["version"]},
                     "Files": {"Get": lambda name: (chart / name).read_text()}}
        for helper in sorted((chart / "templates").glob("_*.tpl")):
            self._render(self._parse(helper.read_text()), self.root)

    def render(self, name: str) -> str:
        return self._render(self._parse((self.chart / "templates" / name).read_text()), self.root)

    def _parse(self, text: str) -> list:
        parts: list = []
        pos = 0
        for match in self.TOKEN.finditer(text):
            before = text[pos:match.start()]
            if match.group(1):
                before = before.rstrip()
            parts.append(("text", before))
            parts.append(("action", match.group(2), bool(match.group(3))))
            pos = match.end()
        parts.append(("text", text[pos:]))
        out, trim = [], False  # apply right-trims to the following text
        for part in parts:
            if part[0] == "text":
                out.append(("text", part[1].lstrip() if trim else part[1]))
                trim = False
            else:
                out.append(("action", part[1]))
                trim = part[2]
        tree, rest = self._block(out, 0)
        assert rest == len(out), "unbalanced {{ end }}"
        return tree

    def _block(self, items: list, i: int) -> tuple[list, int]:
        nodes: list = []
        while i < len(items):
            kind, body = items[i]
            if kind == "text":
                nodes.append(("text", body))
                i += 1
                continue
            word = body.split(None, 1)[0] if body else ""
            if word in ("end", "else"):
                return nodes, i
            if body.startswith("/*"):
                i += 1
                continue
            if word in ("if", "define"):
                then, i = self._block(items, i + 1)
                other: list = []
                if items[i][1] == "else":
                    other, i = self._block(items, i + 1)
                assert items[i][1] == "end", body
                nodes.append((word, body.split(None, 1)[1], then, other))
                i += 1
                continue
            nodes.append(("expr", body))
            i += 1
        return nodes, i

    def _render(self, nodes: list, dot: Any) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "define":
                self.defines[self._eval(node[1], dot)] = node[2]
            elif node[0] == "if":
                out.append(self._render(node[2] if self._truthy(self._eval(node[1], dot)) else node[3], dot))
            else:
                value = self._eval(node[1], dot)
                out.append("" if value is None else str(value))
        return "".join(out)

    @staticmethod
    def _truthy(value: Any) -> bool:
        return bool(value)

    def _eval(self, pipeline: str, dot: Any) -> Any:
        value: Any = None
        for n, command in enumerate(self._split(pipeline, "|")):
            args = self._split(command, " ")
            head, rest = args[0], [self._arg(a, dot) for a in args[1:]]
            if n > 0:
                rest.append(value)
            value = self._call(head, rest, dot) if (n > 0 or rest or head in self.FUNCS) else self._arg(head, dot)
        return value

    @staticmethod
    def _split(text: str, sep: str) -> list[str]:
        parts, depth, quote, current = [], 0, False, ""
        for ch in text:
            if ch == '"':
                quote = not quote
            elif not quote and ch == "(":
                depth += 1
            elif not quote and ch == ")":
                depth -= 1
            if ch == sep and not quote and depth == 0:
                if current.strip():
                    parts.append(current.strip())
                current = ""
            else:
                current += ch
        if current.strip():
            parts.append(current.strip())
        return parts

    def _arg(self, token: str, dot: Any) -> Any:
        if token.startswith('"'):
            return json.loads(token)
        if token.startswith("("):
            return self._eval(token[1:-1], dot)
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token in ("true", "false"):
            return token == "true"
        if token == ".":
            return dot
        base, path = (self.root, token[1:]) if token.startswith("$") else (dot, token)
        value = base
        for field in [f for f in path.split(".") if f]:
            value = value.get(field) if isinstance(value, dict) else None
        return value

    FUNCS = {"quote", "toYaml", "nindent", "indent", "b64enc", "default", "required", "printf", "trunc",
             "trimSuffix", "eq", "ne", "not", "and", "or", "include", ".Files.Get"}

    def _call(self, name: str, args: list, dot: Any) -> Any:
        if name == "include":
            return self._render(self.defines[args[0]], args[1])
        if name == ".Files.Get":
            return self.root["Files"]["Get"](args[0])
        if name == "required":
            if not args[1]:
                raise ValueError(args[0])
            return args[1]
        funcs = {
            "quote": lambda v: json.dumps("" if v is None else str(v)),
            "toYaml": lambda v: yaml.safe_dump(v, sort_keys=False, default_flow_style=False).rstrip("\n")
            if v not in (None, {}, []) else ("{}" if v == {} else "[]" if v == [] else ""),
            "nindent": lambda n, v: "\n" + "\n".join(" " * n + line if line else line for line in str(v).split("\n")),
            "indent": lambda n, v: "\n".join(" " * n + line if line else line for line in str(v).split("\n")),
            "b64enc": lambda v: base64.b64encode(str(v).encode()).decode(),
            "default": lambda d, v: v if v else d,
            "printf": lambda fmt, *a: fmt.replace("%s", "{}").format(*a),
            "trunc": lambda n, v: str(v)[:n],
            "trimSuffix": lambda s, v: str(v)[: -len(s)] if str(v).endswith(s) else str(v),
            "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a,
            "and": lambda *a: all(a), "or": lambda *a: any(a),
        }
        return funcs[name](*args)


def _values(**overrides: Any) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values["secrets"]["serverSecret"] = "0123456789abcdef0123456789abcdef"
    for key, value in overrides.items():
        values[key] = value
    return values


def _manifests(values: dict) -> dict[str, dict]:
    renderer = GoTemplate(CHART, values)
    docs: dict[str, dict] = {}
    for template in sorted((CHART / "templates").glob("*.yaml")):
        for doc in yaml.safe_load_all(renderer.render(template.name)):
            if doc:
                docs[doc["kind"]] = doc
    return docs


@pytest.mark.parametrize("mode", ["sidecar", "standalone"])
def test_chart_renders_manifests_that_match_the_gateway(mode: str, tmp_path: Path) -> None:
    from gateway.config import parse_config

    docs_values = _values(mode=mode)
    docs = _manifests(docs_values)
    rendered = _all(docs_values)
    assert sorted(d["kind"] for d in rendered) == sorted(
        ["ConfigMap", "ConfigMap", "Secret", "Deployment", "Service", "Service", "ServiceMonitor", "PrometheusRule",
         "NetworkPolicy"])
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    if mode == "sidecar":
        [moat] = pod["initContainers"]
        assert moat["restartPolicy"] == "Always"
        assert [c["name"] for c in pod["containers"]] == ["triton"]
    else:
        assert "initContainers" not in pod
        [moat] = pod["containers"]
    # The config the gateway reads: parse it with the gateway's own loader, with the Secret's
    # files written where the pod mounts them (re-rooted under tmp_path).
    configmaps = [d for d in rendered if d["kind"] == "ConfigMap"]
    config_text = next(d for d in configmaps if "config.yaml" in d["data"])["data"]["config.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in moat["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = docs["Secret"]
    assert volumes["moat-secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
    for name, content in secret["data"].items():
        target = tmp_path / mounts["moat-secrets"].lstrip("/") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(content))
    raw = yaml.safe_load(config_text)
    for field in ("keys_file", "server_secret_file"):
        assert str(Path(raw["auth"][field]).parent) == mounts["moat-secrets"]
        raw["auth"][field] = str(tmp_path / raw["auth"][field].lstrip("/"))
    assert moat["args"][-1] == f"{mounts['moat-config']}/config.yaml"
    env = {e["name"]: e["value"] for e in moat["env"]}
    assert raw["state"]["params"]["url"] == "${MOAT_REDIS_URL}" and env["MOAT_REDIS_URL"] == docs_values["redis"]["url"]
    raw["state"]["params"]["url"] = env["MOAT_REDIS_URL"]
    config = parse_config(raw, tmp_path)
    assert config.models[0].backend.name == "upstream"
    assert config.models[0].detectors and config.models[0].defenses  # the preset was merged in
    ports = {p["name"]: p["containerPort"] for p in moat["ports"]}
    assert ports == {"grpc": config.server.grpc_port, "metrics": config.server.metrics_port}
    # Only the client and metrics listeners leave the pod's loopback; the admin service does not.
    assert (config.server.host, config.server.metrics_host, config.server.admin_host) == (
        "0.0.0.0", "0.0.0.0", "127.0.0.1")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert moat[probe]["grpc"]["port"] == config.server.grpc_port
    services = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Service"}
    client, metrics = (next(d for n, d in services.items() if n.endswith("-metrics") == m) for m in (False, True))
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    # The clients' Service carries the client port alone; /metrics has its own, which the monitor selects.
    assert {p["name"]: p["port"] for p in client["spec"]["ports"]} == {"grpc": config.server.grpc_port}
    assert {p["name"]: p["port"] for p in metrics["spec"]["ports"]} == {"metrics": config.server.metrics_port}
    assert metrics["spec"]["type"] == "ClusterIP"
    for service in (client, metrics):
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
        assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = docs["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert not monitor["selector"]["matchLabels"].items() <= client["metadata"]["labels"].items()
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items() and policy["policyTypes"] == ["Ingress"]
    opened = {rule["ports"][0]["port"]: rule.get("from") for rule in policy["ingress"]}
    assert opened == {config.server.grpc_port: None, config.server.metrics_port: [{"namespaceSelector": {}}]}
    assert monitor["endpoints"][0]["port"] == "metrics" and monitor["endpoints"][0]["path"] == "/metrics"
    assert {"targetLabel": "job", "replacement": "moat"} in monitor["endpoints"][0]["relabelings"]
    rules = yaml.safe_load((DEPLOY / "prometheus/rules.yaml").read_text())
    assert docs["PrometheusRule"]["spec"] == rules
    dashboard = next(d for d in configmaps if "moat.json" in d["data"])
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["moat.json"]) == json.loads((DEPLOY / "grafana/moat.json").read_text())
    if mode == "sidecar":
        upstream = config.models[0].backend.params["address"]
        assert upstream == f"127.0.0.1:{docs_values['modelServer']['grpcPort']}"
        assert docs_values["modelServer"]["grpcPort"] not in ports.values()
        # The model server listens on the pod's loopback, and the NetworkPolicy does not open its ports.
        [server] = pod["containers"]
        assert {"--grpc-address=127.0.0.1", "--http-address=127.0.0.1"} <= set(server["args"])
        assert docs_values["modelServer"]["grpcPort"] not in opened


def _all(values: dict) -> list[dict]:
    renderer = GoTemplate(CHART, values)
    return [d for t in sorted((CHART / "templates").glob("*.yaml"))
            for d in yaml.safe_load_all(renderer.render(t.name)) if d]


def test_chart_copies_of_rules_and_dashboard_are_identical() -> None:
    assert (CHART / "files/rules.yaml").read_text() == (DEPLOY / "prometheus/rules.yaml").read_text()
    assert (CHART / "files/moat.json").read_text() == (DEPLOY / "grafana/moat.json").read_text()


def test_chart_requires_a_server_secret() -> None:
    values = _values()
    values["secrets"]["serverSecret"] = ""
    with pytest.raises(ValueError, match="serverSecret"):
        _all(values)


# ------------------------------------------------------------------ Dockerfile and compose
def test_dockerfile_targets_user_and_healthcheck() -> None:
    text = re.sub(r"^#.*\n", "", (DEPLOY / "Dockerfile").read_text(), flags=re.M)  # comments aside
    stages = re.findall(r"^FROM \S+ AS (\S+)", text, re.M)
    assert {"build", "proxy", "full"} <= set(stages)
    proxy = text.split("AS proxy", 1)[1].split("\nFROM ", 1)[0]
    full = text.split("AS full", 1)[1]
    assert "build-full" not in proxy and "torch" not in proxy and "build-full" in full
    for stage in (proxy, full):
        assert re.search(r"^USER 10001", stage, re.M)
    build = text.split("AS build\n", 1)[1].split("\nFROM ", 1)[0]
    assert "torch" not in build and "[models]" not in build
    assert "grpc_health.v1" in text and "HEALTHCHECK" in text
    for copied in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (REPO / copied).exists(), copied
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


_PROXY_IMAGE = """
import asyncio, sys

class NotInTheImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm", "evaluation", "bench"):
            raise ImportError(f"the proxy image has no {name}")

sys.meta_path.insert(0, NotInTheImage())
import grpc, yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from gateway.cli import main
from gateway.config import load_config
from gateway.server import build_gateway

config = yaml.safe_load(open(sys.argv[1]))
assert config["models"][0]["backend"]["name"] == "upstream" and config["state"]["name"] == "redis"
config["state"] = {"name": "memory"}
config["server"].update(host="127.0.0.1", grpc_port=0, metrics_port=0, admin_port=0)
open(sys.argv[2], "w").write(yaml.safe_dump(config))

async def serve():
    gateway = build_gateway(load_config(sys.argv[2]))
    ports = await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        print("health", health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))
    finally:
        await gateway.stop()

asyncio.run(serve())
print("evaluate", main(["evaluate", "--out", sys.argv[3]]))
"""


def test_proxy_image_copies_no_evaluation_and_installs_no_torch() -> None:
    text = re.sub(r"^#.*\n", "", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    build = text.split("AS build\n", 1)[1].split("\nFROM ", 1)[0]
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", build, re.M))
    assert {"contracts", "gateway", "detectors", "defenses", "protos"} <= copied
    assert not copied & {"evaluation", "bench"} and "torch" not in build


def test_proxy_image_serves_without_evaluation_or_torch(tmp_path: Path) -> None:
    """What the `proxy` image runs: the gateway in upstream mode, its health service up, with torch
    and the evaluation suite absent; `moat evaluate` says why it is unavailable instead of crashing."""
    env = {"MOAT_KEYS_FILE": str(DEPLOY / "configs/demo-keys.yaml"),
           "MOAT_SERVER_SECRET_FILE": str(DEPLOY / "configs/demo-secret"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", _PROXY_IMAGE, str(DEPLOY / "configs/sidecar.yaml"), str(tmp_path / "config.yaml"),
         str(tmp_path / "report")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["health SERVING", "evaluate 2"], result.stdout
    assert "evaluate" in result.stderr and "has no evaluation" in result.stderr
    assert not (tmp_path / "report").exists()


def test_compose_stack_wires_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"moat", "upstream", "redis", "prometheus", "grafana"} <= set(services)
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    assert services["moat"]["build"]["target"] == "proxy"
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == ["moat:8002"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_publishes_only_the_client_port_beyond_loopback() -> None:
    """Issue 26: every published port but moat's 8001 is bound to the host's loopback."""
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    published = [(name, str(port)) for name, service in services.items() for port in service.get("ports", [])]
    open_to_all = [(name, port) for name, port in published if not port.startswith("127.0.0.1:")]
    assert open_to_all == [("moat", "8001:8001")]
    assert services["moat"]["environment"]["MOAT_METRICS_HOST"] == "0.0.0.0"  # for the stack's Prometheus


def test_images_listen_beyond_loopback_only_on_the_client_port(monkeypatch) -> None:
    """The proxy image's config, with no deployment's environment: /metrics and admin on loopback."""
    from gateway.config import load_config

    for name in ("MOAT_HOST", "MOAT_METRICS_HOST", "MOAT_ADMIN_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MOAT_KEYS_FILE", str(DEPLOY / "configs/demo-keys.yaml"))
    monkeypatch.setenv("MOAT_SERVER_SECRET_FILE", str(DEPLOY / "configs/demo-secret"))
    server = load_config(DEPLOY / "configs/sidecar.yaml").server
    assert (server.host, server.metrics_host, server.admin_host) == ("0.0.0.0", "127.0.0.1", "127.0.0.1")
    text = re.sub(r"^#.*\n", "", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    assert re.findall(r"^EXPOSE (.*)$", text, re.M) == ["8001"]
    assert not re.search(r"--(admin|metrics)-host", text)
