#!/usr/bin/env python3
"""Runs the built sprintlink image the way a user would (called by .ci/image).

    run_checks.py single  --image IMG --work DIR --hub-url URL --calls FILE
    run_checks.py compose --image IMG --work DIR --hub-url URL --calls FILE --root REPO
    run_checks.py kube    --image IMG --work DIR --root REPO --rendered RENDERED.yaml...

DOCKER_HOST must point at the engine. Each check prints one line per step;
the first failure raises, prints the containers' logs and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

UID = "10001"
STOP_GRACE = 40  # docker run --stop-timeout / Compose stop_grace_period
SHUTDOWN_LIMIT = 30  # seconds: server.shutdown_timeout_ms (25 s) plus a margin


class CheckFailed(Exception):
    pass


def ok(msg: str) -> None:
    print(f"   ok  {msg}", flush=True)


def info(msg: str) -> None:
    print(f"       {msg}", flush=True)


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)
    ok(msg)


def sh(*args: str, check: bool = True, input: bytes | None = None, timeout: float = 300) -> str:
    p = subprocess.run(args, input=input, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise CheckFailed(f"{' '.join(args)} exited {p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
    return p.stdout.decode(errors="replace")


def docker(*args: str, **kw) -> str:
    return sh("docker", *args, **kw)


def inspect(obj: str) -> dict:
    return json.loads(docker("inspect", obj))[0]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 10) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait(what: str, timeout: float, f) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = f()
            if last is True:
                return
        except (OSError, ValueError, CheckFailed) as e:
            last = e
        time.sleep(0.5)
    raise CheckFailed(f"{what}: not within {timeout:.0f} s (last: {last!r})")


def wait_healthy(container: str, timeout: float = 120) -> float:
    t0 = time.monotonic()

    def healthy():
        st = inspect(container)["State"]
        if not st["Running"]:
            raise CheckFailed(f"{container} is not running (exit {st['ExitCode']})")
        return st.get("Health", {}).get("Status") == "healthy" or st.get("Health", {}).get("Status")

    wait(f"{container} HEALTHCHECK healthy", timeout, healthy)
    return time.monotonic() - t0


def published(container: str, port: str = "8080/tcp") -> str:
    bindings = inspect(container)["NetworkSettings"]["Ports"].get(port) or []
    if not bindings:
        raise CheckFailed(f"{container}: {port} is not published")
    b = bindings[0]
    host = b["HostIp"] if b["HostIp"] not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return f"http://{host}:{b['HostPort']}"


def link_calls(calls: Path) -> list[dict]:
    if not calls.exists():
        return []
    out = []
    for line in calls.read_text().splitlines():
        r = json.loads(line)
        if r["method"] == "POST" and r["path"] == "/customobjects/link":
            out.append(r)
    return out


def pairs(calls: Path) -> list[tuple]:
    return [(c["body"]["objectId"], c["body"]["targetId"]) for c in link_calls(calls)]


class Signer:
    """Signs bodies with the image's own `sprintlink sign`, using the config the service runs."""

    def __init__(self, image: str, mounts: list[str], env: dict[str, str], config: str):
        self.image, self.mounts, self.env, self.config = image, mounts, env, config

    def sign(self, work: Path, body: dict) -> tuple[bytes, dict]:
        raw = json.dumps(body, separators=(",", ":")).encode()
        f = work / "body.json"
        f.write_bytes(raw)
        f.chmod(0o644)
        args = ["run", "--rm", "--network", "none", "--read-only"]
        for m in self.mounts:
            args += ["-v", m]
        if self.env:  # through a file, so that no secret shows in a command line or an error
            envfile = work / "sign.env"
            envfile.write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))
            envfile.chmod(0o600)
            args += ["--env-file", str(envfile)]
        args += ["-v", f"{f}:/tmp/body.json:ro", self.image, "sign", "--config", self.config,
                 "--source", "erp", "--file", "/tmp/body.json"]
        out = docker(*args)
        headers = {"content-type": "application/json"}
        for line in out.splitlines():
            if not line.strip():
                break
            k, _, v = line.partition(": ")
            headers[k.strip()] = v.strip()
        if "webhook-signature" not in headers:
            raise CheckFailed(f"sprintlink sign printed no signature: {out!r}")
        return raw, headers


def event(n: int, run: str) -> dict:
    return {"id": f"ci-{run}-{n}", "type": "object.created",
            "data": {"object_id": 5000 + n, "lead_id": 9000 + n}}


def admin_events(base: str, token: str) -> list[dict]:
    st, body = http("GET", f"{base}/admin/events?limit=500", headers={"authorization": f"Bearer {token}"})
    if st != 200:
        raise CheckFailed(f"GET /admin/events answered {st}: {body[:300]!r}")
    return json.loads(body)["events"]


def dump_logs(*containers: str) -> None:
    for c in containers:
        p = subprocess.run(["docker", "logs", "--tail", "60", c], capture_output=True)
        print(f"--- docker logs --tail 60 {c}")
        sys.stdout.write(p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace"))


def timed_stop(container: str) -> float:
    t0 = time.monotonic()
    docker("stop", container, timeout=STOP_GRACE + 30)
    elapsed = time.monotonic() - t0
    st = inspect(container)["State"]
    need(st["ExitCode"] == 0 and not st["OOMKilled"],
         f"docker stop {container}: exit code {st['ExitCode']} after {elapsed:.1f} s")
    need(elapsed < SHUTDOWN_LIMIT,
         f"{container} stopped within the drain limit ({elapsed:.1f} s < {SHUTDOWN_LIMIT} s < grace {STOP_GRACE} s)")
    return elapsed


# ---------------------------------------------------------------------------------------------
# A single container with SQLite on a volume

def single(a) -> None:
    work = Path(a.work) / "single"
    (work / "secrets").mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    (work / "secrets").chmod(0o755)
    token, admin = secrets.token_hex(16), secrets.token_hex(16)
    whsec = "whsec_" + __import__("base64").b64encode(secrets.token_bytes(32)).decode()
    for name, value in (("sprinthub-api-token", token), ("admin-token", admin),
                        ("erp-webhook-secret", whsec)):
        p = work / "secrets" / name
        p.write_text(value)
        p.chmod(0o444)
    (Path(a.work) / "hub-token").write_text(token)
    cfg = work / "sprintlink.toml"
    cfg.write_text(f"""# written by .ci/image-lib/run_checks.py
[server]
listen = "0.0.0.0:8080"
shutdown_timeout_ms = 25000

[storage]
url = "sqlite:///data/sprintlink.db"

[sprinthub]
base_url = "{a.hub_url}"
instance = "ci"
api_token = "file:/etc/sprintlink/secrets/sprinthub-api-token"
rate_limit_per_second = 0

[delivery]
initial_backoff_ms = 1000

[admin]
token = "file:/etc/sprintlink/secrets/admin-token"

[[sources]]
name = "erp"
scheme = "standard-webhooks"
secrets = ["file:/etc/sprintlink/secrets/erp-webhook-secret"]
event_type = "/type"
accept_types = ["object.created"]
object_id = "/data/object_id"

[sources.lead]
id = "/data/lead_id"
""")
    cfg.chmod(0o444)
    mounts = [f"{cfg}:/etc/sprintlink/sprintlink.toml:ro", f"{work / 'secrets'}:/etc/sprintlink/secrets:ro"]
    volume, name, net = "slci-data", "slci-single", a.network
    docker("rm", "-f", name, check=False)
    docker("volume", "rm", "-f", volume, check=False)
    docker("volume", "create", volume)

    def run() -> str:
        # What deploy/README.md tells a user to run, plus a private network and a random host port.
        docker("run", "-d", "--name", name, "--network", net, "-p", "127.0.0.1::8080",
               "--stop-timeout", str(STOP_GRACE), "--read-only", "--tmpfs", "/tmp",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
               "-v", f"{volume}:/data", *sum((["-v", m] for m in mounts), []), a.image)
        secs = wait_healthy(name)
        ok(f"HEALTHCHECK healthy after {secs:.1f} s")
        return published(name)

    signer = Signer(a.image, mounts, {}, "/etc/sprintlink/sprintlink.toml")
    calls = Path(a.calls)
    try:
        base = run()
        img = inspect(a.image)["Config"]
        need(img["User"] == f"{UID}:{UID}", f"image USER is {img['User']}")
        need(docker("exec", name, "id", "-u").strip() == UID, "the process runs as UID 10001 (non-root)")
        need(inspect(name)["HostConfig"]["ReadonlyRootfs"], "root filesystem is read-only")
        p = subprocess.run(["docker", "exec", name, "touch", "/usr/local/bin/x"], capture_output=True)
        need(p.returncode != 0, "writing to the root filesystem fails")
        st, _ = http("GET", f"{base}/healthz")
        need(st == 200, f"GET /healthz -> {st}")

        run_id = secrets.token_hex(3)
        n_events = 3
        for n in range(n_events):
            raw, headers = signer.sign(work, event(n, run_id))
            st, body = http("POST", f"{base}/webhooks/erp", raw, headers)
            need(st == 202, f"signed webhook {n} -> {st} {body[:120]!r}")
        raw, headers = signer.sign(work, event(99, run_id))
        headers["webhook-signature"] = "v1," + "A" * 43 + "="
        st, body = http("POST", f"{base}/webhooks/erp", raw, headers)
        need(st == 401 and b"invalid_signature" in body, f"a forged signature -> {st} {body[:80]!r}")

        want = {(5000 + n, 9000 + n) for n in range(n_events)}
        wait("links at the fake SprintHub", 60, lambda: want <= set(pairs(calls)) or sorted(pairs(calls)))
        got = pairs(calls)
        need(sorted(got) == sorted(want), f"each event linked once at the fake SprintHub on the host ({len(got)} calls)")
        c0 = link_calls(calls)[0]
        need(c0["instance"] == "ci" and c0["token_ok"] and c0["body"]["linkType"] == "lead"
             and c0["body"]["amount"] == 1, "link call carries instance, token, linkType lead, amount 1")
        wait("events delivered", 30, lambda: all(e["state"] == "delivered" for e in admin_events(base, admin))
             and len(admin_events(base, admin)) == n_events)
        ok(f"admin API: {n_events} events delivered")

        timed_stop(name)
        docker("rm", name)
        base = run()
        evs = admin_events(base, admin)
        need(len(evs) == n_events and all(e["state"] == "delivered" for e in evs),
             f"after a restart on the same volume: {len(evs)} events, all delivered")
        raw, headers = signer.sign(work, event(n_events, run_id))
        st, _ = http("POST", f"{base}/webhooks/erp", raw, headers)
        need(st == 202, f"a webhook after the restart -> {st}")
        want.add((5000 + n_events, 9000 + n_events))
        wait("the new event's link", 60, lambda: set(pairs(calls)) == want or sorted(pairs(calls)))
        time.sleep(2)
        need(sorted(pairs(calls)) == sorted(want), "no event was linked twice across the restart")
        (Path(a.work) / "single-url").write_text(base)
    except Exception:
        dump_logs(name)
        raise


# ---------------------------------------------------------------------------------------------
# Compose: PostgreSQL + two replicas

def free_port_pair() -> int:
    for _ in range(200):
        p = 20000 + secrets.randbelow(20000)
        try:
            for q in (p, p + 1):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", q))
            return p
        except OSError:
            continue
    raise CheckFailed("no two free consecutive ports")


def compose(a) -> None:
    root = Path(a.root).resolve()
    work = Path(a.work) / "compose"
    work.mkdir(parents=True, exist_ok=True)
    src = (root / "deploy/compose.yaml").read_text()
    m = re.search(r"^name:\s*(\S+)\s*$", src, re.M)
    project = m.group(1) if m else "sprintlink"
    # Debian's docker-compose 1.29 predates the top-level `name:` key: the
    # same file without it, and the name as -p.
    (work / "compose.yaml").write_text(re.sub(r"^name:.*\n", "", src, flags=re.M))
    port = free_port_pair()
    # The token the fake SprintHub expects (written by the single-container check).
    token, admin = (Path(a.work) / "hub-token").read_text(), secrets.token_hex(16)
    whsec = "whsec_" + __import__("base64").b64encode(secrets.token_bytes(32)).decode()
    # deploy/compose.yaml takes its secrets as files from deploy/secrets/ (git-ignored), as a
    # user writes them (deploy/README.md); the .env file holds no secret.
    pg_password = secrets.token_hex(16)
    secret_dir = root / "deploy" / "secrets"
    secret_dir.mkdir(exist_ok=True)
    secret_files = {
        "postgres_password": pg_password,
        "database_url": f"postgres://sprintlink:{pg_password}@postgres:5432/sprintlink?sslmode=disable",
        "sprinthub_api_token": token,
        "admin_token": admin,
        "erp_webhook_secret": whsec,
    }
    for name, value in secret_files.items():
        f = secret_dir / name
        f.write_text(value + "\n")
        # Compose without swarm bind-mounts these files: the container users (10001 for
        # sprintlink, postgres) must be able to read them.
        f.chmod(0o644)
    env = {
        "SPRINTHUB_INSTANCE": "ci",
        "SPRINTHUB_BASE_URL": a.hub_url,
        "SPRINTLINK_PORT": f"{port}-{port + 1}",
    }
    envfile = work / "compose.env"
    envfile.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    envfile.chmod(0o600)
    base_cmd = ["docker-compose", "-p", project, "--project-directory", str(root / "deploy"),
                "--env-file", str(envfile), "-f", str(work / "compose.yaml"),
                "-f", str(root / ".ci/image-lib/compose.ci.yaml")]
    print("       " + " ".join(base_cmd[:1] + ["-p", project, "--project-directory", "deploy",
                                              "--env-file", "ENVFILE", "-f", "compose.yaml(no name:)",
                                              "-f", ".ci/image-lib/compose.ci.yaml"]), flush=True)
    calls = Path(a.calls)
    before = len(link_calls(calls))

    def dc(*args: str, timeout: float = 300) -> str:
        return sh(*base_cmd, *args, timeout=timeout)

    containers: list[str] = []
    try:
        dc("down", "-v", "--remove-orphans", timeout=120)
        t0 = time.monotonic()
        dc("up", "-d", "--no-build", "--scale", "sprintlink=2", timeout=300)
        containers = dc("ps", "-q", "sprintlink").split()
        pg = dc("ps", "-q", "postgres").split()
        need(len(containers) == 2 and len(pg) == 1, "docker-compose up: postgres + 2 sprintlink replicas")
        for c in containers:
            wait_healthy(c, 180)
        ok(f"both replicas healthy after {time.monotonic() - t0:.1f} s "
           f"(PostgreSQL healthy first: depends_on service_healthy)")
        urls = [published(c) for c in containers]
        info(f"replicas at {', '.join(urls)}")
        for c in containers:
            need(inspect(c)["Image"] == inspect(a.image)["Id"], f"replica {c[:12]} runs the image just built")
        signer = Signer(a.image, [f"{root / 'deploy/compose.sprintlink.toml'}:/etc/sprintlink/sprintlink.toml:ro",
                                  f"{secret_dir}:/run/secrets:ro"],
                        {"SPRINTLINK_SPRINTHUB__INSTANCE": "ci",
                         "SPRINTLINK_STORAGE__URL": "sqlite:///tmp/sign.db"},
                        "/etc/sprintlink/sprintlink.toml")
        run_id = secrets.token_hex(3)
        want = set()
        n1 = 6
        for n in range(n1):
            raw, headers = signer.sign(work, event(n, run_id))
            for u in urls:  # the same delivery to both replicas, as a sender retrying elsewhere
                st, body = http("POST", f"{u}/webhooks/erp", raw, headers)
                if not 200 <= st < 300:
                    raise CheckFailed(f"webhook {n} to {u} -> {st} {body[:200]!r}")
            want.add((5000 + n, 9000 + n))
        ok(f"{n1} signed events, each posted to both replicas, accepted")
        new = lambda: pairs(calls)[before:]  # noqa: E731
        wait("links of the events posted to both", 90, lambda: set(new()) == want or sorted(new()))
        time.sleep(3)
        need(sorted(new()) == sorted(want), f"each event linked exactly once ({len(new())} link calls for {n1} events)")
        need(all(c["token_ok"] and c["instance"] == "ci" for c in link_calls(calls)[before:]),
             "the replicas call SprintHub with the token and instance from the environment")

        # Events posted to replica 0, which is stopped right away: nothing may be lost.
        n2 = 6
        for n in range(n1, n1 + n2):
            raw, headers = signer.sign(work, event(n, run_id))
            st, body = http("POST", f"{urls[0]}/webhooks/erp", raw, headers)
            if st != 202:
                raise CheckFailed(f"webhook {n} -> {st} {body[:200]!r}")
            want.add((5000 + n, 9000 + n))
        ok(f"{n2} more events posted to replica 1, then it is stopped at once")
        timed_stop(containers[0])
        wait("every event linked after the stop", 120, lambda: set(new()) == want or sorted(new()))
        time.sleep(3)
        need(sorted(new()) == sorted(want), f"nothing lost, nothing linked twice ({len(new())} link calls for {n1 + n2} events)")
        evs = admin_events(urls[1], admin)
        need(len(evs) == n1 + n2 and all(e["state"] == "delivered" for e in evs),
             f"replica 2's admin API: {len(evs)} events, all delivered")
    except Exception:
        dump_logs(*containers)
        raise
    finally:
        subprocess.run([*base_cmd, "down", "-v", "--remove-orphans", "-t", str(STOP_GRACE)],
                       capture_output=True, timeout=180)
        for name in secret_files:
            (secret_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests against the image

def kube(a) -> None:
    import yaml

    root = Path(a.root).resolve()
    img = inspect(a.image)
    cfg = img["Config"]
    base_toml = tomllib.loads((root / "deploy/base/sprintlink.toml").read_text())
    listen_port = int(base_toml.get("server", {}).get("listen", "0.0.0.0:8080").rsplit(":", 1)[1])
    url = (Path(a.work) / "single-url").read_text() if (Path(a.work) / "single-url").exists() else None
    tags = set(img.get("RepoTags") or [])
    exposed = {int(p.split("/")[0]) for p in (cfg.get("ExposedPorts") or {})}
    for rendered in a.rendered:
        docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
        deps = [d for d in docs if d.get("kind") == "Deployment"]
        need(bool(deps), f"{rendered}: has a Deployment")
        for d in deps:
            spec = d["spec"]["template"]["spec"]
            psc = spec.get("securityContext") or {}
            for c in spec["containers"]:
                w = f"{Path(rendered).name} {d['metadata']['name']}/{c['name']}"
                need(c["image"] in tags,
                     f"{w}: image {c['image']} is the one just built (tags {', '.join(sorted(tags))})")
                need(c.get("command") in (None, cfg["Entrypoint"]),
                     f"{w}: command {c.get('command') or '(image ENTRYPOINT)'} = ENTRYPOINT {cfg['Entrypoint']}")
                need((c.get("args") or cfg["Cmd"]) == cfg["Cmd"] == ["serve"],
                     f"{w}: args {c.get('args')} run `serve` (image CMD {cfg['Cmd']})")
                sc = {**psc, **(c.get("securityContext") or {})}
                uid, gid = cfg["User"].split(":")
                need(str(sc.get("runAsUser")) == uid and str(sc.get("runAsGroup", gid)) == gid,
                     f"{w}: runAsUser/runAsGroup {sc.get('runAsUser')}:{sc.get('runAsGroup')} = image USER {cfg['User']}")
                ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
                need(set(ports.values()) <= exposed and listen_port in ports.values(),
                     f"{w}: containerPort {sorted(ports.values())} = EXPOSE {sorted(exposed)} = listen port {listen_port}")
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    pr = c.get(probe)
                    if not pr:
                        continue
                    hg = pr.get("httpGet")
                    if not hg:
                        info(f"{w}: {probe} is not httpGet: {pr}")
                        continue
                    port = ports.get(hg["port"], hg["port"])
                    need(port == listen_port, f"{w}: {probe} port {hg['port']} -> {port}")
                    if url:
                        st, _ = http("GET", url + hg["path"])
                        need(st == 200, f"{w}: {probe} {hg['path']} answered {st} by the built image")
                env = {e["name"]: e.get("value") for e in c.get("env") or []}
                if "SPRINTLINK_CONFIG" in env:
                    need(f"SPRINTLINK_CONFIG={env['SPRINTLINK_CONFIG']}" in cfg["Env"],
                         f"{w}: SPRINTLINK_CONFIG {env['SPRINTLINK_CONFIG']} = the image's")
                mounts = {m["mountPath"] for m in c.get("volumeMounts") or []}
                need("/data" in mounts and "/tmp" in mounts,
                     f"{w}: /data and /tmp are volumes (the root filesystem is read-only, WORKDIR {cfg['WorkingDir']})")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["single", "compose", "kube"])
    ap.add_argument("--rendered", nargs="*", default=[])
    ap.add_argument("--image", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--hub-url")
    ap.add_argument("--calls")
    ap.add_argument("--root", default=".")
    ap.add_argument("--network", default="slci-net")
    a = ap.parse_args()
    try:
        {"single": single, "compose": compose, "kube": kube}[a.what](a)
    except CheckFailed as e:
        print(f"   FAIL {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
