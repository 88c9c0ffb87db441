#!/usr/bin/env python3
"""The deployment checks behind scripts/check-deploy (run it, not this file: it sets up the tools).

Each check prints what it does and what it found; the run ends with a summary and exits non-zero
when any check failed. `--update` first rewrites the generated files (deploy/kubernetes/, the
chart's copies of the alert rules and the dashboard, deploy/grafana/METRICS.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import kubernetes_validate
import yaml

# The Kubernetes version the service's client targets (k8s-openapi feature v1_33).
KUBE_VERSION = "1.33.0"
RELEASE = "orchestrator"
NAMESPACE = "incidentfox"
# Custom resources have no schema in kubernetes-validate's Kubernetes OpenAPI set.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

SECRET_VARS = [
    "DATABASE_URL",
    "DB_PASSWORD",
    "SLACK_SIGNING_SECRET",
    "GITHUB_WEBHOOK_SECRET",
    "PAGERDUTY_WEBHOOK_SECRET",
    "INCIDENTIO_WEBHOOK_SECRET",
    "ORCHESTRATOR_INTERNAL_ADMIN_TOKEN",
    "ORCHESTRATOR_INTERNAL_TOKEN",
    "ORCHESTRATOR_SECRETS_KEY",
    "INVESTIGATE_AUTH_TOKEN",
]

# Exactly what the service does in K8S_NAMESPACE; kept in this order (a Rust test compares it too).
EXPECTED_ROLE_RULES = [
    {"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["delete", "get", "list", "patch", "watch"]},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["delete", "get", "list", "patch", "watch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["delete", "get", "list", "patch", "watch"]},
]

GENERATED_HEADER = (
    "# Generated from helm/orchestrator with its default values (release {release}, namespace {ns})\n"
    "# by `scripts/check-deploy --update`. Do not edit: change the chart and re-run it.\n"
)

# Labels Prometheus adds to every series of the scrape configs in deploy/prometheus and the chart.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "release", "container", "service", "endpoint"}
# Standard metrics the dashboard and alerts may use besides the service's own.
STANDARD_METRICS = {
    "up": set(),
    "process_cpu_seconds_total": set(),
    "process_resident_memory_bytes": set(),
    "process_open_fds": set(),
    "process_start_time_seconds": set(),
}
PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "inf", "nan",
}


class Failure(Exception):
    pass


class Runner:
    def __init__(self) -> None:
        self.results: list[tuple[str, str, float, str]] = []

    def check(self, name: str, fn: Callable[[], str | None]) -> None:
        print(f"\n== {name}", flush=True)
        start = time.monotonic()
        try:
            note = fn() or ""
            status = "PASS"
        except Failure as e:
            note = str(e)
            status = "FAIL"
            print(f"   FAIL: {e}", flush=True)
        except Exception as e:  # a tool crashed: a failure too, with its type
            note = f"{type(e).__name__}: {e}"
            status = "FAIL"
            print(f"   FAIL ({type(e).__name__}): {e}", flush=True)
        elapsed = time.monotonic() - start
        if status == "PASS":
            print(f"   ok{': ' + note if note else ''} ({elapsed:.1f}s)", flush=True)
        self.results.append((status, name, elapsed, note))

    def summary(self) -> int:
        print("\n== summary")
        for status, name, elapsed, note in self.results:
            first = note.splitlines()[0] if note else ""
            print(f"   {status}  {name} ({elapsed:.1f}s){' - ' + first if status == 'FAIL' else ''}")
        failed = sum(1 for r in self.results if r[0] == "FAIL")
        passed = len(self.results) - failed
        print(f"\ndeploy: {passed} passed, {failed} failed")
        return 1 if failed else 0


def info(msg: str) -> None:
    print(f"   {msg}", flush=True)


# ---- chart rendering -------------------------------------------------------------------------------


def load_values_file(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise Failure(f"{path}: not a YAML map")
    return data


def render(chart_dir: Path, values: dict[str, Any] | None) -> dict[str, str]:
    with helm.Chart.load(str(chart_dir)) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects_of(manifests: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append((path, doc))
    return out


def value_sets(root: Path) -> list[tuple[str, dict[str, Any] | None]]:
    sets: list[tuple[str, dict[str, Any] | None]] = [("defaults", None)]
    for f in sorted((root / "helm/orchestrator/ci").glob("*-values.yaml")):
        sets.append((f.name.removesuffix("-values.yaml"), load_values_file(f)))
    return sets


# ---- policy on rendered objects -------------------------------------------------------------------


def env_map(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def check_policy(objs: list[tuple[str, dict[str, Any]]], values: dict[str, Any] | None) -> list[str]:
    """What must hold for every value set; returns the problems found."""
    problems: list[str] = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, o in objs:
        by_kind.setdefault(o["kind"], []).append(o)

    for kind in ("ClusterRole", "ClusterRoleBinding"):
        if kind in by_kind:
            problems.append(f"{kind} rendered: the service needs nothing cluster-wide")

    deps = by_kind.get("Deployment", [])
    if len(deps) != 1:
        return [f"expected one Deployment, got {len(deps)}"]
    container = deps[0]["spec"]["template"]["spec"]["containers"][0]
    cm_names = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
    cms = [o for o in by_kind.get("ConfigMap", []) if o["metadata"]["name"] in cm_names]
    if len(cms) != 1:
        return ["the Deployment does not read one settings ConfigMap of the chart"]
    settings = cms[0]["data"]
    for var in SECRET_VARS:
        if var in settings:
            problems.append(f"secret variable {var} in the ConfigMap")
    k8s_ns = settings.get("K8S_NAMESPACE")

    secret_name = ((values or {}).get("secrets") or {}).get("existingSecret", "orchestrator")
    if not (values or {}).get("secrets", {}).get("create") and "Secret" in by_kind:
        problems.append("a Secret is rendered although secrets.create is off")

    for d in deps:
        pod = d["spec"]["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)
        shutdown = int(settings.get("ORCHESTRATOR_SHUTDOWN_GRACE_SECONDS", "20"))
        if grace <= shutdown:
            problems.append(f"terminationGracePeriodSeconds {grace} <= shutdown grace {shutdown}")
        psc = pod.get("securityContext") or {}
        for c in pod["containers"]:
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"container {c['name']}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"container {c['name']}: root filesystem is not read-only")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"container {c['name']}: capabilities not dropped")
            if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                problems.append(f"container {c['name']}: runAsNonRoot not set")
            if (c.get("livenessProbe") or {}).get("httpGet", {}).get("path") != "/health":
                problems.append("liveness probe is not GET /health")
            if (c.get("readinessProbe") or {}).get("httpGet", {}).get("path") != "/ready":
                problems.append("readiness probe is not GET /ready")
            port = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == "http"), None)
            listen = settings.get("ORCHESTRATOR_LISTEN_ADDR", "")
            if port is None or not listen.endswith(f":{port}"):
                problems.append(f"container port {port} does not match ORCHESTRATOR_LISTEN_ADDR {listen}")
            names = [e["name"] for e in c.get("env") or []]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                problems.append(f"container {c['name']}: duplicate env entries {dupes}")
            for name, e in env_map(c).items():
                if name in SECRET_VARS:
                    if "value" in e:
                        problems.append(f"{name} has a literal value")
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    overridden = any(x.get("name") == name for x in (values or {}).get("extraEnv", []))
                    if ref is not None and ref.get("name") != secret_name and not overridden:
                        problems.append(f"{name} read from Secret {ref.get('name')}, not {secret_name}")

    jobs = by_kind.get("Job", [])
    migrate = [j for j in jobs if j["metadata"]["name"].endswith("-migrate")]
    if (values or {}).get("migrations", {}).get("enabled", True):
        if len(migrate) != 1:
            problems.append("no migration Job")
        for j in migrate:
            hooks = set(j["metadata"].get("annotations", {}).get("helm.sh/hook", "").split(","))
            if hooks != {"pre-install", "pre-upgrade"}:
                problems.append(f"migration Job hooks are {hooks}")
            c = j["spec"]["template"]["spec"]["containers"][0]
            if c.get("args") != ["migrate"]:
                problems.append("migration Job does not run `migrate`")
            if c.get("envFrom"):
                problems.append("migration Job reads envFrom (the ConfigMap does not exist yet on first install)")
            env = env_map(c)
            missing = sorted(set(settings) - set(env))
            if missing:
                problems.append(f"migration Job lacks settings {missing}")
            if not ({"DATABASE_URL", "DB_PASSWORD"} & set(env)):
                problems.append("migration Job has no database credentials")
            extra_secrets = sorted(set(env) & set(SECRET_VARS) - {"DATABASE_URL", "DB_PASSWORD"})
            if extra_secrets:
                problems.append(f"migration Job gets secrets it does not need: {extra_secrets}")
            pod_labels = j["spec"]["template"]["metadata"].get("labels", {})
            if deps and all(pod_labels.get(k) == v for k, v in deps[0]["spec"]["selector"]["matchLabels"].items()):
                problems.append("migration pods match the Deployment's selector (the Service would route to them)")

    roles = by_kind.get("Role", [])
    for r in roles:
        if r["rules"] != EXPECTED_ROLE_RULES:
            problems.append(f"Role rules differ from the expected least privilege: {r['rules']}")
        if r["metadata"].get("namespace") != k8s_ns:
            problems.append(f"Role in {r['metadata'].get('namespace')}, K8S_NAMESPACE is {k8s_ns}")
    if (values or {}).get("rbac", {}).get("create", True) and len(roles) != 1:
        problems.append("no Role rendered")

    autoscaled = (values or {}).get("autoscaling", {}).get("enabled", False)
    if autoscaled != ("HorizontalPodAutoscaler" in by_kind):
        problems.append("HorizontalPodAutoscaler rendered although autoscaling is off, or missing")
    if autoscaled and "replicas" in deps[0]["spec"]:
        problems.append("the Deployment sets replicas although the HPA owns them")
    if (values or {}).get("podDisruptionBudget", {}).get("enabled", True) != ("PodDisruptionBudget" in by_kind):
        problems.append("PodDisruptionBudget does not follow podDisruptionBudget.enabled")

    for ing in by_kind.get("Ingress", []):
        for rule in ing["spec"].get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                if (p["path"], p["pathType"]) not in {("/webhooks", "Prefix"), ("/health", "Exact")}:
                    problems.append(f"Ingress exposes {p['pathType']} {p['path']}")
    return problems


# ---- metrics used by the dashboard and the alerts ---------------------------------------------------


def service_metrics(root: Path) -> dict[str, tuple[str, set[str]]]:
    """Metric name -> (type, label names), read from src/metrics.rs."""
    src = (root / "src/metrics.rs").read_text()
    found: dict[str, tuple[str, set[str]]] = {}
    pattern = re.compile(
        r'"([a-z_][a-z0-9_]*)",\s*"(?:[^"\\]|\\.)*"\s*(\))?\s*(?:,\s*&\[([^\]]*)\])?', re.S
    )
    for m in pattern.finditer(src):
        name, labels = m.group(1), m.group(3)
        before = src[max(0, m.start() - 40) : m.start()]
        kind = "histogram" if ("histogram(" in before or "HistogramOpts::new(" in before) else "other"
        label_set = set(re.findall(r'"([a-z_][a-z0-9_]*)"', labels or ""))
        found[name] = (kind, label_set)
    if len(found) < 5:
        raise Failure(f"could read only {len(found)} metrics from src/metrics.rs; has its layout changed?")
    return found


def allowed_series(root: Path) -> dict[str, set[str]]:
    """Every series name a query may use -> its label names (target labels not included)."""
    allowed: dict[str, set[str]] = dict(STANDARD_METRICS)
    for name, (kind, labels) in service_metrics(root).items():
        if kind == "histogram":
            allowed[f"{name}_bucket"] = labels | {"le"}
            allowed[f"{name}_sum"] = set(labels)
            allowed[f"{name}_count"] = set(labels)
        else:
            allowed[name] = set(labels)
    return allowed


def promql_usage(expr: str) -> tuple[list[tuple[str, set[str]]], list[set[str]]]:
    """The metrics an expression selects (with the labels it matches on) and its grouping label lists."""
    selectors: list[tuple[str, set[str]]] = []
    groupings: list[set[str]] = []
    text = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "X", expr)  # Grafana variables
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries

    def selector(m: re.Match[str]) -> str:
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
        selectors.append((m.group(1) or "", labels))
        return f" {m.group(1) or ''} "

    text = re.sub(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}", selector, text)

    def grouping(m: re.Match[str]) -> str:
        groupings.append(set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", m.group(2))))
        return " "

    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", grouping, text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue
        # Numbers like 1e3 never match (they start with a digit); a bare name is a selector.
        if not any(s[0] == word for s in selectors):
            selectors.append((word, set()))
    return [s for s in selectors if s[0]], groupings


def check_queries(exprs: list[tuple[str, str]], allowed: dict[str, set[str]]) -> tuple[set[str], list[str]]:
    used: set[str] = set()
    problems: list[str] = []
    for where, expr in exprs:
        selectors, groupings = promql_usage(expr)
        names = set()
        for name, labels in selectors:
            used.add(name)
            names.add(name)
            if name not in allowed:
                problems.append(f"{where}: unknown metric {name}")
                continue
            bad = labels - allowed[name] - TARGET_LABELS
            if bad:
                problems.append(f"{where}: {name} has no label {sorted(bad)}")
        known = set().union(*(allowed.get(n, set()) for n in names)) | TARGET_LABELS | {"le"}
        for g in groupings:
            bad = g - known
            if bad:
                problems.append(f"{where}: grouping by unknown label {sorted(bad)}")
        if not selectors:
            problems.append(f"{where}: no metric in {expr!r}")
    return used, problems


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    exprs: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    exprs.append((f"panel {p.get('title')!r}", t["expr"]))
            walk(p.get("panels", []))

    walk(dashboard.get("panels", []))
    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and isinstance(q, str):
            m = re.match(r"label_values\((.*),\s*[A-Za-z_]+\)\s*$", q)
            exprs.append((f"variable {v['name']}", m.group(1) if m else q))
    return exprs


def dashboard_metrics(root: Path) -> list[str]:
    dashboard = json.loads((root / "deploy/grafana/orchestrator.json").read_text())
    used, _ = check_queries(dashboard_exprs(dashboard), allowed_series(root))
    return sorted(used)


# ---- generated files ---------------------------------------------------------------------------------


def expected_generated(root: Path) -> dict[Path, str]:
    """Every generated file and the content it must have."""
    files: dict[Path, str] = {}
    header = GENERATED_HEADER.format(release=RELEASE, ns=NAMESPACE)
    for path, text in sorted(render(root / "helm/orchestrator", None).items()):
        if path.endswith("NOTES.txt") or not any(True for d in yaml.safe_load_all(text) if d):
            continue
        files[root / "deploy/kubernetes" / Path(path).name] = header + "---\n" + text.strip() + "\n"
    files[root / "helm/orchestrator/files/prometheus-rules.yml"] = (root / "deploy/prometheus/rules.yml").read_text()
    files[root / "helm/orchestrator/files/grafana-dashboard.json"] = (root / "deploy/grafana/orchestrator.json").read_text()
    files[root / "deploy/grafana/METRICS.txt"] = "".join(f"{m}\n" for m in dashboard_metrics(root))
    return files


def update_generated(root: Path) -> None:
    # The chart's copies first: the default render does not use them, but keep the order obvious.
    files = expected_generated(root)
    out_dir = root / "deploy/kubernetes"
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.yaml"):
        if stale not in files:
            stale.unlink()
            info(f"removed {stale.relative_to(root)}")
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != content:
            path.write_text(content)
            info(f"wrote {path.relative_to(root)}")


# ---- the checks ---------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--update", action="store_true")
    parser.add_argument("--promtool", default="promtool")
    args = parser.parse_args()
    root: Path = args.root.resolve()
    chart_dir = root / "helm/orchestrator"
    bin_dir = Path(sys.executable).parent
    runner = Runner()

    if args.update:
        runner.check("update generated files (deploy/kubernetes, chart copies, METRICS.txt)", lambda: update_generated(root))

    sets = value_sets(root)
    rendered: dict[str, list[tuple[str, dict[str, Any]]]] = {}

    def lint() -> str:
        problems = []
        for name, values in sets:
            report = helm.lint(str(chart_dir), values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
            for msg in report.get("messages", []):
                level = {0: "unknown", 1: "info", 2: "warning", 3: "error"}.get(msg.get("severity"), "?")
                line = f"[{name}] {level}: {msg.get('path')}: {msg.get('error')}"
                info(line)
                if msg.get("severity", 0) >= 2:
                    problems.append(line)
            problems += [f"[{name}] {e}" for e in report.get("errors", [])]
        if problems:
            raise Failure("helm lint --strict found problems:\n" + "\n".join(problems))
        return f"{len(sets)} value sets lint clean (strict, Kubernetes v{KUBE_VERSION})"

    runner.check(f"helm lint (Helm SDK {helm.helm_sdk_version()}) with each value set: " + ", ".join(n for n, _ in sets), lint)

    def render_and_validate() -> str:
        problems = []
        count = 0
        skipped: set[str] = set()
        for name, values in sets:
            try:
                objs = objects_of(render(chart_dir, values))
            except helm.HelmError as e:
                problems.append(f"[{name}] render failed: {e}")
                continue
            rendered[name] = objs
            kinds = []
            for path, obj in objs:
                kinds.append(obj["kind"])
                if obj["kind"] in CRD_KINDS:
                    skipped.add(obj["kind"])
                    continue
                try:
                    used = kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
                    if used != "1.33":
                        problems.append(f"[{name}] validated against {used}, not 1.33")
                    count += 1
                except kubernetes_validate.ValidationError as e:
                    loc = "/".join(str(p) for p in e.path)
                    problems.append(f"[{name}] {path} {obj['kind']}/{obj['metadata']['name']}: {loc}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    problems.append(f"[{name}] {path}: {e.message}")
            info(f"[{name}] {len(objs)} objects: {', '.join(sorted(kinds))}")
            for p in check_policy(objs, values):
                problems.append(f"[{name}] policy: {p}")
        if problems:
            raise Failure("\n".join(problems))
        note = f"{count} objects valid against the Kubernetes {KUBE_VERSION} schemas (strict: unknown fields rejected)"
        if skipped:
            note += f"; not schema-checked (CRDs, no schema in kubernetes-validate): {', '.join(sorted(skipped))}"
        return note

    runner.check(
        f"render each value set, validate every object (kubernetes-validate, Kubernetes {KUBE_VERSION}) and the policy "
        "(security context, probes, grace, Role, secrets, Ingress paths)",
        render_and_validate,
    )

    def bad_values() -> str:
        problems = []
        cases = sorted((chart_dir / "ci/invalid").glob("*.yaml"))
        if not cases:
            raise Failure("no bad value files in helm/orchestrator/ci/invalid")
        for f in cases:
            text = f.read_text()
            m = re.search(r"^# expect: (.+)$", text, re.M)
            if not m:
                problems.append(f"{f.name}: no `# expect:` line")
                continue
            try:
                render(chart_dir, load_values_file(f))
                problems.append(f"{f.name}: accepted, expected an error containing {m.group(1)!r}")
            except helm.HelmError as e:
                msg = str(e)
                if m.group(1) not in msg:
                    problems.append(f"{f.name}: rejected, but the error does not mention {m.group(1)!r}: {msg}")
                else:
                    reason = next((l.strip() for l in msg.splitlines() if m.group(1) in l), msg.splitlines()[-1])
                    info(f"{f.name}: rejected: {reason[:150]}")
        if problems:
            raise Failure("\n".join(problems))
        return f"{len(cases)} bad value files rejected"

    runner.check("bad values are rejected (values.schema.json and template checks)", bad_values)

    def in_sync() -> str:
        expected = expected_generated(root)
        problems = []
        for path, content in expected.items():
            rel = path.relative_to(root)
            if not path.exists():
                problems.append(f"{rel} is missing")
            elif path.read_text() != content:
                problems.append(f"{rel} differs from what it is generated from")
        for existing in (root / "deploy/kubernetes").glob("*.yaml"):
            if existing not in expected:
                problems.append(f"{existing.relative_to(root)} is not in the default render")
        if problems:
            raise Failure("\n".join(problems) + "\nrun `scripts/check-deploy --update` and review the diff")
        return f"{len(expected)} generated files up to date"

    runner.check("deploy/kubernetes equals the chart's default render; chart copies of rules and dashboard, METRICS.txt in sync", in_sync)

    def metrics() -> str:
        allowed = allowed_series(root)
        dashboard = json.loads((root / "deploy/grafana/orchestrator.json").read_text())
        ids = []

        def walk(panels: list[dict[str, Any]]) -> None:
            for p in panels:
                ids.append(p.get("id"))
                if p.get("type") != "row" and p.get("targets"):
                    if not all(t.get("datasource", {}).get("uid") == "${datasource}" for t in p["targets"]):
                        problems.append(f"panel {p.get('title')!r}: a target does not use the $datasource variable")
                walk(p.get("panels", []))

        problems: list[str] = []
        walk(dashboard.get("panels", []))
        if len(ids) != len(set(ids)):
            problems.append("dashboard panel ids are not unique")
        used_d, p1 = check_queries(dashboard_exprs(dashboard), allowed)
        rules = yaml.safe_load((root / "deploy/prometheus/rules.yml").read_text())
        exprs = []
        for g in rules["groups"]:
            for r in g["rules"]:
                exprs.append((f"rule {r.get('alert') or r.get('record')}", r["expr"]))
                if "alert" in r:
                    if not re.fullmatch(r"(?:[A-Z][a-z0-9]*)+", r["alert"]):
                        problems.append(f"alert {r['alert']} is not PascalCase")
                    if r.get("labels", {}).get("severity") not in {"critical", "warning", "info"}:
                        problems.append(f"alert {r['alert']} has no severity label")
                    missing = {"summary", "description", "runbook"} - set(r.get("annotations", {}))
                    if missing:
                        problems.append(f"alert {r['alert']} lacks annotations {sorted(missing)}")
        used_r, p2 = check_queries(exprs, allowed)
        problems += p1 + p2
        if problems:
            raise Failure("\n".join(problems))
        info(f"dashboard queries {len(used_d)} series names; alerts {len(used_r)}")
        return "every metric and label exists in src/metrics.rs (or is up/process_*)"

    runner.check("dashboard and alert rules use only the service's metrics and labels", metrics)

    def documented() -> str:
        schema = json.loads((chart_dir / "values.schema.json").read_text())
        values = yaml.safe_load((chart_dir / "values.yaml").read_text())
        readme = (chart_dir / "README.md").read_text()

        def resolve(node: dict[str, Any]) -> dict[str, Any]:
            while "$ref" in node:
                node = schema["definitions"][node["$ref"].rsplit("/", 1)[-1]]
            return node

        problems: list[str] = []

        def walk(value: Any, node: dict[str, Any], path: list[str]) -> list[str]:
            node = resolve(node)
            props = node.get("properties")
            if isinstance(value, dict) and props and node.get("additionalProperties") is False:
                for key in sorted(set(props) - set(value) - {"global"}):
                    problems.append(f"schema allows {'.'.join(path + [key])} but values.yaml does not set it")
                leaves = []
                for key, sub in value.items():
                    if key not in props:
                        problems.append(f"values.yaml sets {'.'.join(path + [key])}, which the schema refuses")
                    leaves += walk(sub, props.get(key, {}), path + [key])
                return leaves
            return [".".join(path)]

        leaves = walk(values, schema, [])
        problems += [f"README.md does not document `{leaf}`" for leaf in leaves if f"`{leaf}`" not in readme]
        if problems:
            raise Failure("\n".join(problems))
        return f"{len(leaves)} values documented in helm/orchestrator/README.md"

    runner.check("every chart value is in the schema and documented in the chart README", documented)

    def promtool() -> str:
        prom = root / "deploy/prometheus"
        run([args.promtool, "check", "rules", str(prom / "rules.yml")])
        run([args.promtool, "test", "rules", str(prom / "rules_test.yml")])
        # Debian's Prometheus is built without Kubernetes service discovery: check the rest of the
        # scrape config with the kubernetes_sd_configs swapped for a static target.
        cfg = yaml.safe_load((prom / "scrape-config.yml").read_text())
        for job in cfg.get("scrape_configs", []):
            if not job.get("kubernetes_sd_configs"):
                raise Failure(f"scrape job {job.get('job_name')} has no kubernetes_sd_configs")
            job.pop("kubernetes_sd_configs")
            job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
        cfg["rule_files"] = [str(prom / f) for f in cfg.get("rule_files", [])]
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "prometheus.yml"
            path.write_text(yaml.safe_dump(cfg))
            run([args.promtool, "check", "config", str(path)])
        return "rules valid, unit tests pass, scrape config valid (kubernetes_sd_configs not checkable with Debian's promtool)"

    runner.check("promtool: check rules, test rules, check the scrape config", promtool)

    def squawk() -> str:
        files = sorted((root / "migrations").glob("*.sql"))
        if not files:
            return "no migrations yet: nothing to lint"
        run([str(bin_dir / "squawk"), "--config", str(root / ".squawk.toml"), "--reporter", "gcc",
             *[str(f.relative_to(root)) for f in files]], cwd=root)
        return f"{len(files)} migrations clean"

    runner.check("squawk on migrations/*.sql (config: .squawk.toml)", squawk)

    def hadolint() -> str:
        run([str(bin_dir / "hadolint"), "--failure-threshold", "style", str(root / "Dockerfile")])
        return "no findings"

    runner.check("hadolint on Dockerfile", hadolint)

    return runner.summary()


def run(cmd: list[str], cwd: Path | None = None) -> None:
    info("$ " + " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd)))
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout.rstrip().splitlines():
        info("  " + line)
    if p.returncode != 0:
        raise Failure(f"{os.path.basename(cmd[0])} exited {p.returncode}")


if __name__ == "__main__":
    sys.exit(main())
