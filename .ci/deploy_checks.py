#!/usr/bin/env python3
"""Policy checks for sprintlink's deployment files, beyond schema validation.

Run by .ci/static-checks with the tools' venv; it can be run alone too:

    .ci/.venv/bin/python .ci/deploy_checks.py toml FILE...
    .ci/.venv/bin/python .ci/deploy_checks.py kube OVERLAY RENDERED.yaml
    .ci/.venv/bin/python .ci/deploy_checks.py compose deploy/compose.yaml
    .ci/.venv/bin/python .ci/deploy_checks.py dockerfile Dockerfile
    .ci/.venv/bin/python .ci/deploy_checks.py urls FILE...

Each check prints one line per problem and exits 1 if there was any.
The TOML rules follow SPEC section 3; the Kubernetes rules are the deployment
contract written in deploy/README.md (probes, drain timing, security context,
secrets as files, one SQLite writer, HPA/PDB for PostgreSQL).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import yaml

SECRETS_DIR = "/etc/sprintlink/secrets"
COMPOSE_SECRETS_DIR = "/run/secrets"
MIB = 1024 * 1024
# server.max_buffered_bytes' default; the memory limit must hold it twice plus a baseline.
DEFAULT_MAX_BUFFERED = 64 * MIB
MEMORY_BASELINE = 64 * MIB
# The only ports a pod may reach (NetworkPolicy egress): DNS, HTTPS, PostgreSQL.
EGRESS_ALLOWED = {(53, "UDP"), (53, "TCP"), (443, "TCP"), (5432, "TCP")}
EGRESS_REQUIRED = {(53, "UDP"), (443, "TCP")}
# Environment variable names that would carry a secret.
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|STORAGE__URL|DATABASE_URL|API_KEY", re.I)
CONFIG_PATH = "/etc/sprintlink/sprintlink.toml"
UID = 10001
PRESTOP_SLEEP_DEFAULT = 0

# SPEC section 3: every key, per section.
KNOWN = {
    "server": {
        "listen", "max_body_bytes", "request_timeout_ms", "shutdown_timeout_ms",
        "max_buffered_bytes",
    },
    "storage": {"url"},
    "sprinthub": {
        "base_url", "instance", "api_token", "timeout_ms", "concurrency",
        "rate_limit_per_second",
    },
    "delivery": {
        "max_attempts", "initial_backoff_ms", "max_backoff_ms", "max_age_hours",
        "lease_seconds",
    },
    "admin": {"token", "secure_cookies", "failed_auth_limit", "failed_auth_window_seconds"},
    "lookup": {"cache_ttl_seconds", "negative_cache_ttl_seconds", "cache_capacity"},
}
SOURCE_KEYS = {
    "name", "scheme", "secrets", "tolerance_seconds", "signature_header", "encoding",
    "prefix", "event_id", "event_type", "accept_types", "object_id", "lead",
}
LEAD_KEYS = {"id", "key", "lookup", "field", "create_missing", "create_fields"}
SCHEMES = {"standard-webhooks", "github", "stripe", "hmac-sha256"}
DEFAULT_SHUTDOWN_MS = 25000

problems: list[str] = []


def problem(where: str, msg: str) -> None:
    problems.append(f"{where}: {msg}")


def is_pointer(v: object) -> bool:
    return isinstance(v, str) and (v == "" or v.startswith("/"))


def secret_refs(cfg: dict) -> list[tuple[str, str]]:
    """Every secret-valued setting of a parsed config, as (setting, value)."""
    refs = []
    for sect, key in (("sprinthub", "api_token"), ("admin", "token"), ("storage", "url")):
        v = cfg.get(sect, {}).get(key)
        if isinstance(v, str):
            refs.append((f"{sect}.{key}", v))
    for i, src in enumerate(cfg.get("sources", []) or []):
        if not isinstance(src, dict):
            continue
        for j, v in enumerate(src.get("secrets", []) or []):
            if isinstance(v, str):
                refs.append((f"sources[{i}].secrets[{j}]", v))
    return refs


# --------------------------------------------------------------------------
# TOML (SPEC section 3)
# --------------------------------------------------------------------------

def check_toml_text(where: str, text: str) -> dict:
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        problem(where, f"not valid TOML: {e}")
        return {}
    for sect, value in cfg.items():
        if sect == "sources":
            continue
        if sect not in KNOWN:
            problem(where, f"unknown section [{sect}]")
            continue
        if not isinstance(value, dict):
            problem(where, f"[{sect}] must be a table")
            continue
        for key in value:
            if key not in KNOWN[sect]:
                problem(where, f"unknown key {sect}.{key}")
    srv = cfg.get("server", {})
    if "listen" in srv and not re.fullmatch(r"[^\s:]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", srv["listen"]):
        problem(where, f"server.listen {srv['listen']!r} is not host:port")
    for sect, key in (("server", "max_body_bytes"), ("server", "request_timeout_ms"),
                      ("server", "shutdown_timeout_ms"), ("sprinthub", "timeout_ms"),
                      ("sprinthub", "concurrency"), ("delivery", "max_attempts"),
                      ("delivery", "initial_backoff_ms"), ("delivery", "max_backoff_ms"),
                      ("delivery", "max_age_hours"), ("delivery", "lease_seconds")):
        v = cfg.get(sect, {}).get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            problem(where, f"{sect}.{key} must be a positive integer, not {v!r}")
    rl = cfg.get("sprinthub", {}).get("rate_limit_per_second")
    if rl is not None and (not isinstance(rl, (int, float)) or isinstance(rl, bool) or rl < 0):
        problem(where, f"sprinthub.rate_limit_per_second must be a number >= 0, not {rl!r}")
    url = cfg.get("storage", {}).get("url")
    if url is not None and not re.match(r"(sqlite:|postgres(ql)?://|env:|file:)", url):
        problem(where, f"storage.url {url!r} is neither sqlite: nor postgres://")
    d = cfg.get("delivery", {})
    if isinstance(d.get("lease_seconds"), int) and isinstance(cfg.get("sprinthub", {}).get("timeout_ms"), int):
        if d["lease_seconds"] * 1000 <= cfg["sprinthub"]["timeout_ms"]:
            problem(where, "delivery.lease_seconds must exceed sprinthub.timeout_ms, "
                           "or a slow attempt is claimed twice")

    sources = cfg.get("sources", [])
    if not isinstance(sources, list):
        problem(where, "sources must be an array of tables ([[sources]])")
        sources = []
    names = set()
    for i, src in enumerate(sources):
        w = f"{where}: sources[{i}]"
        for key in src:
            if key not in SOURCE_KEYS:
                problem(w, f"unknown key {key}")
        name = src.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9_-]{1,64}", name):
            problem(w, f"name {name!r} must match [a-z0-9_-]{{1,64}}")
        elif name in names:
            problem(w, f"duplicate source name {name!r}")
        names.add(name)
        if src.get("scheme") not in SCHEMES:
            problem(w, f"scheme {src.get('scheme')!r} is not one of {sorted(SCHEMES)}")
        secrets = src.get("secrets")
        if not isinstance(secrets, list) or not secrets or not all(isinstance(s, str) and s for s in secrets):
            problem(w, "secrets must be a non-empty list of strings")
        if src.get("scheme") == "hmac-sha256":
            if not src.get("signature_header"):
                problem(w, "hmac-sha256 needs signature_header")
            if src.get("encoding", "hex") not in ("hex", "base64"):
                problem(w, "encoding must be hex or base64")
        for key in ("event_id", "event_type", "object_id"):
            if key in src and not is_pointer(src[key]):
                problem(w, f"{key} {src[key]!r} is not a JSON pointer")
        if "object_id" not in src:
            problem(w, "object_id (JSON pointer to the custom object id) is missing")
        if "accept_types" in src and not (isinstance(src["accept_types"], list)
                                          and all(isinstance(t, str) for t in src["accept_types"])):
            problem(w, "accept_types must be a list of strings")
        lead = src.get("lead")
        if not isinstance(lead, dict):
            problem(w, "[sources.lead] is missing")
            continue
        for key in lead:
            if key not in LEAD_KEYS:
                problem(w, f"unknown key lead.{key}")
        if ("id" in lead) == ("key" in lead):
            problem(w, "lead needs exactly one of id or key")
        for key in ("id", "key"):
            if key in lead and not is_pointer(lead[key]):
                problem(w, f"lead.{key} {lead[key]!r} is not a JSON pointer")
        if "key" in lead and lead.get("lookup", "table") not in ("table", "sprinthub"):
            problem(w, "lead.lookup must be table or sprinthub")
        if lead.get("lookup") == "sprinthub" and lead.get("field") not in ("email", "whatsapp", "mobile"):
            problem(w, "lead.field must be email, whatsapp or mobile")
    return cfg


def cmd_toml(paths: list[str]) -> None:
    for p in paths:
        check_toml_text(p, Path(p).read_text())


# --------------------------------------------------------------------------
# Rendered Kubernetes manifests
# --------------------------------------------------------------------------

def sel_matches(selector: dict, labels: dict) -> bool:
    ml = (selector or {}).get("matchLabels", selector or {})
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def parse_quantity(q: object) -> int | None:
    """A Kubernetes memory quantity (256Mi, 1Gi, 500M, 1048576) in bytes."""
    if q is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    if not m:
        return None
    mult = {None: 1, "Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB, "Ti": 1024 ** 4,
            "k": 1000, "M": 1000 ** 2, "G": 1000 ** 3, "T": 1000 ** 4}[m.group(2)]
    return int(float(m.group(1)) * mult)


def cmd_kube(overlay: str, rendered: str) -> None:
    where = f"{overlay} ({rendered})"
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    deps = by_kind.get("Deployment", [])
    if len(deps) != 1:
        problem(where, f"expected one Deployment, found {len(deps)}")
        return
    dep = deps[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels", {})
    if not sel_matches(spec.get("selector"), pod_labels):
        problem(where, "Deployment selector does not match its pod labels")
    cons = pod.get("containers", [])
    con = next((c for c in cons if c["name"] == "sprintlink"), None)
    if con is None:
        problem(where, "no container named sprintlink")
        return

    # Configuration: ConfigMap mounted where SPRINTLINK_CONFIG points.
    env = {e["name"]: e.get("value") for e in con.get("env", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in con.get("volumeMounts", [])}
    if env.get("SPRINTLINK_CONFIG") != CONFIG_PATH:
        problem(where, f"SPRINTLINK_CONFIG should be {CONFIG_PATH}")
    cfg = {}
    m = mounts.get(CONFIG_PATH)
    if not m:
        problem(where, f"nothing mounted at {CONFIG_PATH}")
    else:
        cm_name = vols.get(m["name"], {}).get("configMap", {}).get("name")
        cms = [c for c in by_kind.get("ConfigMap", []) if c["metadata"]["name"] == cm_name]
        if not cms:
            problem(where, f"ConfigMap {cm_name!r} mounted at {CONFIG_PATH} is not in the output")
        else:
            text = cms[0].get("data", {}).get(m.get("subPath", ""))
            if text is None:
                problem(where, f"ConfigMap {cm_name} has no key {m.get('subPath')!r}")
            else:
                cfg = check_toml_text(f"{where}: ConfigMap {cm_name}", text)

    # Secrets: mounted as files, and every secret setting is a file: reference to them.
    sm = mounts.get(SECRETS_DIR)
    if not sm or "secret" not in vols.get(sm["name"], {}):
        problem(where, f"no Secret volume mounted at {SECRETS_DIR}")
    elif not sm.get("readOnly"):
        problem(where, f"{SECRETS_DIR} must be mounted readOnly")
    refs = secret_refs(cfg)
    for key, value in env.items():
        if key.startswith("SPRINTLINK_") and isinstance(value, str) and value.startswith(("file:", "env:")):
            refs.append((f"env {key}", value))
    for setting, ref in refs:
        if ref.startswith("sqlite:"):
            continue
        if not ref.startswith(f"file:{SECRETS_DIR}/"):
            # The value itself is never printed: it may be a real secret.
            problem(where, f"{setting} is not a file: reference under {SECRETS_DIR}")
    for e in con.get("env", []):
        if re.search(r"TOKEN|SECRET|PASSWORD", e["name"]) and "value" in e:
            problem(where, f"env {e['name']} carries a literal value: use the Secret")

    # Probes.
    port = next((p for p in con.get("ports", []) if p.get("name") == "http"), None)
    if not port or port.get("containerPort") != 8080:
        problem(where, "container port 'http' must be 8080 (server.listen)")
    listen = cfg.get("server", {}).get("listen", "0.0.0.0:8080")
    if not listen.endswith(":8080") or listen.startswith("127."):
        problem(where, f"server.listen {listen!r} must listen on all interfaces, port 8080")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        got = con.get(probe, {}).get("httpGet", {}).get("path")
        if got != path:
            problem(where, f"{probe} must GET {path}, not {got!r}")
    if con.get("livenessProbe", {}).get("httpGet", {}).get("path") == "/readyz":
        problem(where, "liveness on /readyz would restart every pod during a database outage")

    # Drain timing: preStop + shutdown_timeout_ms < terminationGracePeriodSeconds.
    grace = pod.get("terminationGracePeriodSeconds", 30)
    shutdown_ms = cfg.get("server", {}).get("shutdown_timeout_ms", DEFAULT_SHUTDOWN_MS)
    pre = con.get("lifecycle", {}).get("preStop", {})
    sleep_s = PRESTOP_SLEEP_DEFAULT
    cmd = pre.get("exec", {}).get("command", [])
    if len(cmd) == 2 and cmd[0] == "sleep":
        sleep_s = int(cmd[1])
    elif "sleep" in pre:
        sleep_s = int(pre["sleep"]["seconds"])
    if grace * 1000 < sleep_s * 1000 + shutdown_ms + 5000:
        problem(where, f"terminationGracePeriodSeconds {grace} leaves under 5 s of margin over "
                       f"preStop {sleep_s} s + shutdown_timeout_ms {shutdown_ms}")

    # Resources.
    res = con.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(kind, {}):
                problem(where, f"resources.{kind}.{r} is not set")

    # Memory: the limit must hold server.max_buffered_bytes twice (request bodies being read
    # plus what is queued for the group commit) plus the baseline and a memory-backed /tmp.
    limit = parse_quantity(res.get("limits", {}).get("memory"))
    buffered = cfg.get("server", {}).get("max_buffered_bytes", DEFAULT_MAX_BUFFERED)
    tmp_vol = vols.get(mounts.get("/tmp", {}).get("name"), {}).get("emptyDir", {})
    tmp_mem = parse_quantity(tmp_vol.get("sizeLimit")) if tmp_vol.get("medium") == "Memory" else 0
    need = 2 * buffered + MEMORY_BASELINE + (tmp_mem or 0)
    if limit is None or limit < need:
        problem(where, f"resources.limits.memory must be at least {need // MIB}Mi "
                       f"(2 x max_buffered_bytes + {MEMORY_BASELINE // MIB}Mi + memory-backed /tmp)")

    # NetworkPolicy: inbound to the service port only; outbound DNS, 443, PostgreSQL.
    nps = [n for n in by_kind.get("NetworkPolicy", [])
           if sel_matches(n["spec"].get("podSelector"), pod_labels)]
    if len(nps) != 1:
        problem(where, f"expected one NetworkPolicy selecting the pods, found {len(nps)}")
    else:
        np = nps[0]["spec"]
        if set(np.get("policyTypes", [])) != {"Ingress", "Egress"}:
            problem(where, "NetworkPolicy policyTypes must be [Ingress, Egress]")
        for rule in np.get("ingress", []):
            ports = rule.get("ports") or []
            if not ports or any(p.get("port") not in (8080, "http") or p.get("protocol", "TCP") != "TCP"
                                for p in ports):
                problem(where, "NetworkPolicy ingress must allow TCP 8080 (http) only")
        seen = set()
        for rule in np.get("egress", []):
            ports = rule.get("ports") or []
            if not ports:
                problem(where, "NetworkPolicy egress rule without ports allows everything")
            for p in ports:
                key = (p.get("port"), p.get("protocol", "TCP"))
                seen.add(key)
                if key not in EGRESS_ALLOWED:
                    problem(where, f"NetworkPolicy egress to {key[0]}/{key[1]} is not needed")
        for key in sorted(EGRESS_REQUIRED - seen):
            problem(where, f"NetworkPolicy egress must allow {key[0]}/{key[1]}")
        if overlay == "postgres" and (5432, "TCP") not in seen:
            problem(where, "NetworkPolicy egress must allow PostgreSQL (5432/TCP)")

    # Security context.
    psc, csc = pod.get("securityContext", {}), con.get("securityContext", {})
    want = {
        "runAsNonRoot": True, "runAsUser": UID, "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
    }
    for k, v in want.items():
        if csc.get(k, psc.get(k) if k in ("runAsNonRoot", "runAsUser") else None) != v:
            problem(where, f"container securityContext.{k} must be {v}")
    if csc.get("capabilities", {}).get("drop") != ["ALL"]:
        problem(where, "container securityContext.capabilities.drop must be [ALL]")
    seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
    if seccomp != "RuntimeDefault":
        problem(where, "seccompProfile must be RuntimeDefault")
    if psc.get("fsGroup") != UID:
        problem(where, f"pod securityContext.fsGroup must be {UID} (volumes writable by the user)")
    if pod.get("automountServiceAccountToken") is not False:
        problem(where, "automountServiceAccountToken should be false")

    # Writable paths: with a read-only root, /data and /tmp must be volumes.
    for path in ("/data", "/tmp"):
        if path not in mounts or mounts[path].get("readOnly"):
            problem(where, f"{path} must be a writable volume (read-only root filesystem)")

    # Service routes to the pods.
    for svc in by_kind.get("Service", []):
        if not sel_matches(svc["spec"].get("selector"), pod_labels):
            problem(where, f"Service {svc['metadata']['name']} selector does not match the pods")
        for p in svc["spec"].get("ports", []):
            if p.get("targetPort") not in ("http", 8080):
                problem(where, f"Service port {p.get('name')} does not target the http port")

    storage = env.get("SPRINTLINK_STORAGE__URL") or cfg.get("storage", {}).get("url", "")
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    pdbs = by_kind.get("PodDisruptionBudget", [])
    data_vol = vols.get(mounts.get("/data", {}).get("name"), {})

    if overlay == "single":
        if spec.get("replicas") != 1:
            problem(where, "SQLite: spec.replicas must be exactly 1")
        if spec.get("strategy", {}).get("type") != "Recreate":
            problem(where, "SQLite: strategy must be Recreate (one writer at a time)")
        if hpas:
            problem(where, "SQLite: no HorizontalPodAutoscaler (single replica only)")
        if not storage.startswith("sqlite:"):
            problem(where, f"storage.url should be sqlite:, not {storage[:20]!r}")
        elif not storage.startswith("sqlite:///data/"):
            problem(where, "SQLite database must live on the /data volume")
        claim = data_vol.get("persistentVolumeClaim", {}).get("claimName")
        if not claim:
            problem(where, "/data must be a PersistentVolumeClaim")
        elif claim not in [p["metadata"]["name"] for p in by_kind.get("PersistentVolumeClaim", [])]:
            problem(where, f"PersistentVolumeClaim {claim} is not in the output")
        if len([k for k in data_vol if k != "name"]) != 1:
            problem(where, "/data volume must have exactly one source")
    elif overlay == "postgres":
        if "replicas" in spec:
            problem(where, "spec.replicas must be left to the HPA (omit it)")
        if storage.startswith("sqlite:"):
            problem(where, "several replicas need PostgreSQL, not SQLite")
        if not storage.startswith(f"file:{SECRETS_DIR}/"):
            problem(where, "storage.url must come from the Secret as a file: reference")
        if spec.get("strategy", {}).get("type", "RollingUpdate") != "RollingUpdate":
            problem(where, "strategy should be RollingUpdate")
        if len(hpas) != 1 or hpas[0]["apiVersion"] != "autoscaling/v2":
            problem(where, "expected one autoscaling/v2 HorizontalPodAutoscaler")
        else:
            h = hpas[0]["spec"]
            ref = h.get("scaleTargetRef", {})
            if (ref.get("kind"), ref.get("name")) != ("Deployment", dep["metadata"]["name"]):
                problem(where, "HPA does not target the Deployment")
            if h.get("minReplicas", 1) < 2:
                problem(where, "HPA minReplicas should be at least 2")
            if h.get("maxReplicas", 0) < h.get("minReplicas", 1):
                problem(where, "HPA maxReplicas below minReplicas")
            if not res.get("requests", {}).get("cpu"):
                problem(where, "HPA on CPU utilization needs a CPU request")
        if len(pdbs) != 1 or pdbs[0]["apiVersion"] != "policy/v1":
            problem(where, "expected one policy/v1 PodDisruptionBudget")
        elif not sel_matches(pdbs[0]["spec"].get("selector"), pod_labels):
            problem(where, "PodDisruptionBudget selector does not match the pods")
    else:
        problem(where, f"unknown overlay {overlay!r}")


# --------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------

def parse_duration(s: str) -> float:
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(s)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    return total


def cmd_compose(path: str) -> None:
    base = Path(path).parent
    doc = yaml.safe_load(Path(path).read_text())
    svcs = doc.get("services", {})
    pg, app = svcs.get("postgres"), svcs.get("sprintlink")
    if not pg or not app:
        problem(path, "needs services postgres and sprintlink")
        return
    if not str(pg.get("image", "")).startswith("postgres:16"):
        problem(path, "postgres should run image postgres:16")
    if "test" not in pg.get("healthcheck", {}):
        problem(path, "postgres needs a healthcheck")
    if app.get("depends_on", {}).get("postgres", {}).get("condition") != "service_healthy":
        problem(path, "sprintlink must depend on postgres with condition service_healthy")
    build = app.get("build", {})
    ctx = base / (build.get("context", ".") if isinstance(build, dict) else build)
    if not (ctx / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")).is_file():
        problem(path, f"build context {ctx} has no Dockerfile")
    ports = app.get("ports", [])
    if not any(str(p.get("target") if isinstance(p, dict) else p).endswith("8080") for p in ports):
        problem(path, "sprintlink should publish container port 8080")
    for svc_name, svc in svcs.items():
        for p in svc.get("ports", []) or []:
            # ${VAR:-default} may hold colons: take substitutions out before splitting.
            plain = re.sub(r"\$\{[^}]*\}", "VAR", str(p))
            host_ip = p.get("host_ip") if isinstance(p, dict) else (
                plain.rsplit(":", 2)[0] if plain.count(":") >= 2 else None)
            if host_ip != "127.0.0.1":
                problem(path, f"{svc_name}: port {p!r} must be published on 127.0.0.1 only")
    top_secrets = doc.get("secrets", {}) or {}
    for svc_name, svc in svcs.items():
        env = svc.get("environment", {}) or {}
        if isinstance(env, list):
            env = dict(str(e).partition("=")[::2] for e in env)
        for key, value in env.items():
            if SECRET_ENV.search(key) and not (
                key.endswith("_FILE") and str(value).startswith(f"{COMPOSE_SECRETS_DIR}/")
            ):
                # The value itself is never printed: it may be a real secret.
                problem(path, f"{svc_name}: environment {key} carries a secret; use a Compose "
                              f"secret under {COMPOSE_SECRETS_DIR} instead")
        for s_ in svc.get("secrets", []) or []:
            name = s_.get("source") if isinstance(s_, dict) else s_
            if name not in top_secrets or "file" not in (top_secrets.get(name) or {}):
                problem(path, f"{svc_name}: secret {name} is not defined at the top level with file:")
    app_secrets = {s_.get("source") if isinstance(s_, dict) else s_ for s_ in app.get("secrets", []) or []}
    pg_env = pg.get("environment", {}) or {}
    if str(pg_env.get("POSTGRES_PASSWORD_FILE", "")).removeprefix(f"{COMPOSE_SECRETS_DIR}/") not in {
        s_.get("source") if isinstance(s_, dict) else s_ for s_ in pg.get("secrets", []) or []
    }:
        problem(path, "postgres: POSTGRES_PASSWORD_FILE must name one of its Compose secrets")
    env = app.get("environment", {}) or {}
    cfg = {}
    for v in app.get("volumes", []):
        src, _, rest = str(v).partition(":")
        target = rest.split(":")[0]
        if target == env.get("SPRINTLINK_CONFIG", CONFIG_PATH):
            f = base / src
            if not f.is_file():
                problem(path, f"mounted config {f} does not exist")
            else:
                cfg = check_toml_text(str(f), f.read_text())
    if not cfg:
        problem(path, f"no configuration file mounted at {CONFIG_PATH}")
    for setting, ref in secret_refs(cfg):
        if ref.startswith("sqlite:"):
            continue
        name = ref.removeprefix(f"file:{COMPOSE_SECRETS_DIR}/")
        if not ref.startswith(f"file:{COMPOSE_SECRETS_DIR}/"):
            problem(path, f"{setting} is not a file: reference under {COMPOSE_SECRETS_DIR}")
        elif name not in app_secrets:
            problem(path, f"{setting} reads {name}, which is not among sprintlink's secrets")
    if not str(cfg.get("storage", {}).get("url", "")).startswith(f"file:{COMPOSE_SECRETS_DIR}/"):
        problem(path, "storage.url (it holds the database password) must be a Compose secret file")
    shutdown_ms = cfg.get("server", {}).get("shutdown_timeout_ms", DEFAULT_SHUTDOWN_MS)
    if parse_duration(app.get("stop_grace_period", "10s")) * 1000 <= shutdown_ms:
        problem(path, f"stop_grace_period must exceed shutdown_timeout_ms ({shutdown_ms} ms)")


# --------------------------------------------------------------------------
# Dockerfile: what hadolint does not know about this service.
# --------------------------------------------------------------------------

def cmd_dockerfile(path: str) -> None:
    text = Path(path).read_text()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines()]
    final = []
    for l in lines:  # instructions of the last stage only
        if l.upper().startswith("FROM "):
            final = []
        if l and not l.startswith("#"):
            final.append(l)
    joined = "\n".join(final)
    checks = [
        (r"^USER\s+10001(:10001)?$", "final stage must run as numeric USER 10001"),
        (r"^EXPOSE\s+8080$", "EXPOSE 8080"),
        (r'^HEALTHCHECK .*CMD \["/usr/local/bin/sprintlink",\s*"healthcheck"\]', "HEALTHCHECK sprintlink healthcheck"),
        (r'^ENTRYPOINT \["/usr/local/bin/sprintlink"\]$', "ENTRYPOINT [/usr/local/bin/sprintlink]"),
        (r'^CMD \["serve"\]$', 'CMD ["serve"]'),
        (r"SPRINTLINK_CONFIG=/etc/sprintlink/sprintlink\.toml", "ENV SPRINTLINK_CONFIG"),
        (r"^WORKDIR /data$", "WORKDIR /data"),
        (r"org\.opencontainers\.image\.source=", "OCI labels"),
    ]
    for rx, what in checks:
        if not re.search(rx, joined, re.M):
            problem(path, f"missing: {what}")
    if not re.search(r"cargo build --release --locked", text):
        problem(path, "must build with cargo build --release --locked")
    # Files copied from the context must exist and not be excluded by .dockerignore.
    ignore = Path(path).parent / ".dockerignore"
    for src in re.findall(r"^COPY\s+(?!--from)(\S+)\s", text, re.M):
        if src != "." and not (Path(path).parent / src).exists():
            problem(path, f"COPY source {src} does not exist")
    if ignore.is_file():
        pats = [l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")]
        for must in ("/target", "/.git"):
            if must not in pats:
                problem(str(ignore), f"should exclude {must}")


# --------------------------------------------------------------------------
# PostgreSQL URLs in examples and documentation
# --------------------------------------------------------------------------

PG_URL = re.compile(r"postgres(?:ql)?://[^\s'\"`<>]+")


def cmd_urls(paths: list[str]) -> None:
    """Every PostgreSQL URL shown to operators verifies the server (sslmode=verify-full).
    Exempt: the Compose service `postgres`, reached over the host's private network."""
    for p in paths:
        for n, line in enumerate(Path(p).read_text().splitlines(), 1):
            for url in PG_URL.findall(line):
                host = re.sub(r"^postgres(?:ql)?://([^@/]*@)?", "", url).split("/")[0].split(":")[0]
                if host == "postgres":
                    continue
                if "sslmode=verify-full" not in url:
                    problem(f"{p}:{n}", "a PostgreSQL URL without sslmode=verify-full "
                                        "(require accepts any certificate)")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "toml":
        cmd_toml(args)
    elif cmd == "kube" and len(args) == 2:
        cmd_kube(*args)
    elif cmd == "compose" and len(args) == 1:
        cmd_compose(args[0])
    elif cmd == "dockerfile" and len(args) == 1:
        cmd_dockerfile(args[0])
    elif cmd == "urls" and args:
        cmd_urls(args)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for p in problems:
        print(f"  FAIL {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
