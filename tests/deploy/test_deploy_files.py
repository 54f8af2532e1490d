"""``deploy/`` is exercised, not just present.

Static checks: the compose file validates against the Compose specification
(``check-jsonschema --builtin-schema vendor.compose-spec``), every YAML file parses, the
Kubernetes objects agree with each other (selectors, named ports, probes, secrets), the
image and the systemd unit have the sandboxing they claim, and every ``KEYBRAKE_*`` variable
named anywhere in ``deploy/`` is one Keybrake reads.

Then each deployment runs: the image's entrypoint and command with the compose replica's
environment (and Redis started with the compose command, AUTH on), the Kubernetes
Deployment's container, and the systemd unit's ``ExecStart``, each with exactly those
arguments, in a network namespace of its own; their health checks and probes are run or
asked as the orchestrator would, and every port they declare answers.
"""

from __future__ import annotations

import json
import re
import shlex
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from tests.conftest import KEYBRAKE, ROOT, postgres_schema
from tests.deploy._deployed import (
    DEPLOY,
    PathMap,
    Relay,
    get,
    hosts_file,
    interpolate,
    start,
    stop,
    unverified,
    wait_until_up,
)
from tests.netns import Netns, namespaces, netns_unusable

IMAGE_PATHS = ["/var/lib/keybrake", "/etc/keybrake", "/run/secrets", "/opt/keybrake/bin"]
SECRETS = {
    "KEYBRAKE_ADMIN_TOKEN": "kba_deploy_test_0123456789abcdefghijklmnopqrstuvwxyz",
    "KEYBRAKE_REDIS_PASSWORD": "redis-Deploy-Test-pw-4401",
    "POSTGRES_PASSWORD": "pg-unused-by-trust-auth",
}
METRICS_TOKEN = "kbm_deploy_test_abcdefghijklmnopqrstuvwxyz012345"
needs_netns = pytest.mark.skipif(netns_unusable() is not None, reason=str(netns_unusable()))


# -- reading the files -------------------------------------------------------------------------


def containerfile() -> dict[str, list[str]]:
    """Instruction → the texts it was given with (line continuations joined)."""
    text = (DEPLOY / "Containerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.setdefault(word.upper(), []).append(rest.strip())
    return out


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for text in containerfile()["ENV"]:
        for part in shlex.split(text):
            name, _, value = part.partition("=")
            env[name] = value
    return env


def image_command() -> list[str]:
    """ENTRYPOINT + CMD, as the runtime runs them."""
    spec = containerfile()
    entry: list[str] = json.loads(spec["ENTRYPOINT"][-1])
    cmd: list[str] = json.loads(spec["CMD"][-1])
    return entry + cmd


def image_healthcheck() -> list[str]:
    text = containerfile()["HEALTHCHECK"][-1]
    exec_form: list[str] = json.loads(text[text.index("CMD") + 3 :].strip())
    return exec_form


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def kubernetes() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def k8s(kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d
        for d in kubernetes()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def unit() -> list[tuple[str, str]]:
    """(key, value) of ``deploy/systemd/keybrake.service``, repeated keys kept."""
    pairs = []
    for line in (DEPLOY / "systemd" / "keybrake.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def variables_keybrake_reads() -> set[str]:
    names: set[str] = set()
    for f in (ROOT / "addon" / "keybrake").rglob("*.py"):
        names |= set(re.findall(r"\bKEYBRAKE_[A-Z_]+\b", f.read_text()))
    return names


# -- static checks -----------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    tool = Path(sys.executable).with_name("check-jsonschema")
    run = subprocess.run(
        [str(tool), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok -- validation done" in run.stdout


def test_every_yaml_file_parses_and_the_kubernetes_objects_agree() -> None:
    for f in DEPLOY.rglob("*.y*ml"):
        assert list(yaml.safe_load_all(f.read_text())), f
    docs = kubernetes()
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
    }
    (deployment,) = k8s("Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        check = container[probe]["httpGet"]
        assert check["port"] in ports and check["path"] in ("/healthz", "/readyz")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for service in k8s("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    (pdb,) = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    # Secrets are referenced, never written in the manifests.
    assert not k8s("Secret")
    refs = [e for e in container["env"] if "valueFrom" in e]
    assert {e["name"] for e in refs} >= {
        "KEYBRAKE_ADMIN_TOKEN",
        "KEYBRAKE_STORE_PASSWORD",
        "STRIPE_SECRET_KEY",
    }
    for e in container["env"]:
        assert "value" not in e or not re.search(r"(?i)secret|token|password", e["name"])
    # Sandboxing: non-root, read-only root filesystem, no privilege escalation.
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # Network policies: in, workers to the proxy and base URL only; out, no private ranges.
    policies = {p["metadata"]["name"]: p["spec"] for p in k8s("NetworkPolicy")}
    ingress = policies["keybrake-ingress"]["ingress"]
    worker_rule = next(r for r in ingress if "podSelector" in r["from"][0])
    assert {p["port"] for p in worker_rule["ports"]} == {ports["proxy"], ports["base-url"]}
    admin_rule = next(r for r in ingress if r is not worker_rule)
    assert {p["port"] for p in admin_rule["ports"]} == {ports["admin"]}
    internet = next(r for r in policies["keybrake-egress"]["egress"] if "ipBlock" in r["to"][0])
    assert {"10.0.0.0/8", "169.254.0.0/16"} <= set(internet["to"][0]["ipBlock"]["except"])
    workers = policies["keybrake-workers-egress"]["egress"]
    assert {p["port"] for p in workers[0]["ports"]} == {ports["proxy"], ports["base-url"]}


def test_image_and_unit_are_sandboxed() -> None:
    spec = containerfile()
    user = spec["USER"][-1].split(":")[0]
    assert user not in ("0", "root")
    assert "/healthz" in " ".join(image_healthcheck())
    assert image_command()[0] == "keybrake"
    copies = [c.split() for c in spec["COPY"]]
    assert ["deploy/keybrake.toml", image_env()["KEYBRAKE_CONFIG"]] in copies
    settings = dict(unit())
    assert settings["DynamicUser"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["StateDirectory"] == "keybrake"
    assert settings["NoNewPrivileges"] == "yes"
    compose_services = compose()["services"]
    for name in ("keybrake-1", "keybrake-2"):
        assert compose_services[name]["read_only"] is True


def test_every_keybrake_variable_in_deploy_is_one_keybrake_reads() -> None:
    known = variables_keybrake_reads()
    named: set[str] = set()
    for f in DEPLOY.rglob("*"):
        if f.is_file():
            named |= set(re.findall(r"\bKEYBRAKE_[A-Z_]+\b", f.read_text()))
    named -= {"KEYBRAKE_REDIS_PASSWORD"}  # compose's own variable (its .env), not Keybrake's
    assert named, "no KEYBRAKE_ variables found"
    assert named <= known, f"not read by keybrake: {sorted(named - known)}"


# -- running them ------------------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[Netns]:
    reason = netns_unusable()
    if reason is not None:
        pytest.skip(reason)
    with namespaces(1, "kbdep") as (one,), hosts_file(one, ["redis", "postgres", "keybrake"]):
        yield one


@pytest.fixture
def backing(ns: Netns, tmp_path: Path) -> Iterator[str]:
    """Redis as compose starts it (password on stdin, AUTH on, noeviction, AOF) and the
    test PostgreSQL relayed to ``postgres:5432`` in the namespace; yields the audit URL
    (compose's database replaced by a fresh schema of the test database)."""
    redis = compose()["services"]["redis"]
    env = {k: interpolate(str(v), SECRETS) for k, v in redis["environment"].items()}
    cmd = [interpolate(a, SECRETS) for a in redis["command"]]
    directory = tmp_path / "redis"
    directory.mkdir()
    proc = start(ns, cmd, env, directory, tmp_path / "redis.log")
    relay = Relay(ns, 5432, ("127.0.0.1", 5432))
    try:
        with postgres_schema() as audit_url:
            yield audit_url.replace("127.0.0.1", "postgres")
    finally:
        stop(proc)
        relay.close()


def listening(ns: Netns, port: int) -> bool:
    try:
        ns.connect(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@needs_netns
def test_the_image_runs_as_the_compose_replica_says(
    ns: Netns, backing: str, tmp_path: Path
) -> None:
    paths = PathMap(tmp_path, IMAGE_PATHS)
    services = compose()["services"]
    log = tmp_path / "deployed.log"
    # The image: its ENV, the config file it copies, the paths moved under tmp_path.
    etc = paths.dir("/etc/keybrake")
    (etc / "keybrake.toml").write_text(paths((DEPLOY / "keybrake.toml").read_text()))
    (paths.dir("/run/secrets") / "metrics-token").write_text(METRICS_TOKEN + "\n")
    state = paths.dir("/var/lib/keybrake")
    env = {k: paths(v) for k, v in image_env().items()}
    # The CA service first (its command and environment), then a replica.
    ca = services["keybrake-ca"]
    ca_env = {k: paths(interpolate(str(v), SECRETS)) for k, v in ca["environment"].items()}
    made = subprocess.run(
        [*ns.exec_prefix(), str(KEYBRAKE), *ca["command"]],
        env={**start_env(), **env, **ca_env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=state,
    )
    assert made.returncode == 0, made.stderr
    replica = services["keybrake-1"]
    replica_env = {
        k: paths(interpolate(str(v), SECRETS)) for k, v in replica["environment"].items()
    }
    # The one change: the test database instead of compose's own PostgreSQL.
    assert replica_env["KEYBRAKE_AUDIT"] == "postgresql://keybrake@postgres:5432/keybrake"
    replica_env["KEYBRAKE_AUDIT"] = backing
    command = image_command()
    assert command[0] == "keybrake"
    bundle = paths("/var/lib/keybrake/certs/keybrake-ca-bundle.pem")
    trusted = ssl.create_default_context(cafile=bundle)
    proc = start(ns, [str(KEYBRAKE), *command[1:]], {**env, **replica_env}, state, log)
    try:
        wait_until_up(proc, ns, 8443, trusted, log)
        # Every exposed port answers; the health checks pass as the engine runs them.
        for text in containerfile()["EXPOSE"]:
            for port in text.split():
                assert listening(ns, int(port)), f"EXPOSE {port}: nothing listens"
        health = subprocess.run(
            [*ns.exec_prefix(), sys.executable, *[paths(a) for a in image_healthcheck()[1:]]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert health.returncode == 0, health.stderr
        test = compose()["x-keybrake"]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "python"]
        ready = subprocess.run(
            [*ns.exec_prefix(), sys.executable, *[paths(a) for a in test[2:]]],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ready.returncode == 0, ready.stderr + log.read_text(errors="replace")
        status, body = get(ns, 8081, "/readyz", tls=trusted)
        checks = json.loads(body)["checks"]
        assert status == 200, body
        assert checks == {"store": "ok", "policies": "ok", "audit": "ok", "clock": "ok"}
        # The admin API with the admin token, over TLS, for the names compose gives.
        auth = {"Authorization": f"Bearer {SECRETS['KEYBRAKE_ADMIN_TOKEN']}"}
        status, body = get(
            ns, 8081, "/vault/keys", tls=trusted, server_name="keybrake-1", headers=auth
        )
        assert status == 200, body
        # Prometheus's scrape as prometheus.yml configures it.
        scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
        assert scrape["scheme"] == "https"
        port = int(scrape["static_configs"][0]["targets"][0].rsplit(":", 1)[1])
        token = Path(paths(scrape["authorization"]["credentials_file"])).read_text().strip()
        status, body = get(
            ns,
            port,
            scrape["metrics_path"],
            tls=trusted,
            server_name="keybrake-1",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert status == 200 and b"keybrake_" in body
        status, _ = get(ns, port, "/metrics", tls=trusted)
        assert status == 401  # no token, no metrics on a network listener
        # Plain HTTP on a TLS listener is refused.
        status, body = get(ns, 8443, "/healthz")
        assert status == 403 and b"tls_required" in body
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    for secret in (*SECRETS.values(), METRICS_TOKEN):
        assert secret not in text


def start_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("KEYBRAKE_", "PG"))}


@needs_netns
def test_the_kubernetes_container_runs_as_the_deployment_says(
    ns: Netns, backing: str, tmp_path: Path
) -> None:
    paths = PathMap(tmp_path, IMAGE_PATHS)
    (deployment,) = k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (config,) = k8s("ConfigMap", "keybrake-config")
    log = tmp_path / "k8s.log"
    # Volumes: the ConfigMap's file, the TLS secret (an operator certificate), the CA secret
    # copied by the init container's own command.
    etc = paths.dir("/etc/keybrake")
    (etc / "keybrake.toml").write_text(paths(config["data"]["keybrake.toml"]))
    ca = trustme.CA(organization_name="Cluster CA")
    leaf = ca.issue_cert("keybrake.keybrake.svc", "127.0.0.1")
    tls_dir = paths.dir("/etc/keybrake/tls")
    leaf.private_key_pem.write_to_path(str(tls_dir / "tls.key"))
    (tls_dir / "tls.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    ca_secret = tmp_path / "ca-secret"
    made = subprocess.run(
        [str(KEYBRAKE), "ca", "--certs-dir", str(ca_secret)], capture_output=True, timeout=60
    )
    assert made.returncode == 0
    state = paths.dir("/var/lib/keybrake")
    paths.dir("/var/lib/keybrake/certs")
    (init,) = pod["initContainers"]
    init_cmd = [paths(a).replace("/ca/", f"{ca_secret}/") for a in init["command"]]
    assert subprocess.run(init_cmd, timeout=30).returncode == 0
    # The container's environment: plain values as written, secret references filled in.
    secret_values = {
        "redis-password": SECRETS["KEYBRAKE_REDIS_PASSWORD"],
        "postgres-password": SECRETS["POSTGRES_PASSWORD"],
        "admin-token": SECRETS["KEYBRAKE_ADMIN_TOKEN"],
        "metrics-token": METRICS_TOKEN,
    }
    env: dict[str, str] = {}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = paths(str(e["value"]))
        elif e["valueFrom"]["secretKeyRef"]["key"] in secret_values:
            env[e["name"]] = secret_values[e["valueFrom"]["secretKeyRef"]["key"]]
    assert env["KEYBRAKE_AUDIT"] == "postgresql://keybrake@postgres:5432/keybrake"
    env["KEYBRAKE_AUDIT"] = backing  # the test database, as for compose
    image = image_command()
    args = container.get("args", image[1:])
    proc = start(ns, [str(KEYBRAKE), *args], env, state, log)
    try:
        wait_until_up(proc, ns, 8443, unverified(), log)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in ports.values():
            assert listening(ns, port)
        for probe in ("livenessProbe", "startupProbe", "readinessProbe"):
            check = container[probe]["httpGet"]
            tls = unverified() if check["scheme"] == "HTTPS" else None
            status, body = get(ns, ports[check["port"]], check["path"], tls=tls)
            assert status == 200, (probe, body)
        # Metrics: the metrics token from the Secret opens /metrics, and nothing else.
        bearer = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        assert get(ns, ports["admin"], "/metrics", tls=unverified(), headers=bearer)[0] == 200
        assert get(ns, ports["admin"], "/vault/keys", tls=unverified(), headers=bearer)[0] == 401
        # The operator's certificate, trusted by workers that trust the cluster CA.
        verified = ssl.create_default_context(cafile=None)
        ca.configure_trust(verified)
        status, _ = get(
            ns, ports["base-url"], "/healthz", tls=verified, server_name="keybrake.keybrake.svc"
        )
        assert status == 200
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    for secret in (*SECRETS.values(), METRICS_TOKEN):
        assert secret not in text


@needs_netns
def test_the_systemd_unit_runs_as_it_says(ns: Netns, tmp_path: Path) -> None:
    paths = PathMap(tmp_path, IMAGE_PATHS)
    settings = unit()
    env = {}
    for key, value in settings:
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = paths(val)
    env["KEYBRAKE_ADMIN_TOKEN"] = SECRETS["KEYBRAKE_ADMIN_TOKEN"]  # its EnvironmentFile
    exec_start = shlex.split(dict(settings)["ExecStart"])
    assert exec_start[0] == "/opt/keybrake/bin/keybrake"
    state = paths.dir(dict(settings)["WorkingDirectory"])
    log = tmp_path / "systemd.log"
    proc = start(ns, [str(KEYBRAKE), *[paths(a) for a in exec_start[1:]]], env, state, log)
    try:
        wait_until_up(proc, ns, 8443, unverified(), log)
        bundle = paths("/var/lib/keybrake/certs/keybrake-ca-bundle.pem")
        trusted = ssl.create_default_context(cafile=bundle)
        assert get(ns, 8443, "/healthz", tls=trusted)[0] == 200
        listens = [exec_start[i + 1] for i, a in enumerate(exec_start) if a.endswith("-listen")]
        for address in listens:
            assert listening(ns, int(address.rsplit(":", 1)[1])), address
        status, body = get(ns, 8081, "/readyz", tls=trusted)
        assert status == 200, body
        auth = {"Authorization": f"Bearer {SECRETS['KEYBRAKE_ADMIN_TOKEN']}"}
        status, _ = get(
            ns, 8081, "/vault/keys", tls=trusted, server_name="keybrake.internal", headers=auth
        )
        assert status == 200
        assert Path(paths("/var/lib/keybrake/keybrake.db")).exists()  # SQLite in the state dir
        # ExecReload: SIGHUP is handled (a --tls-name certificate has nothing to re-read,
        # and the process keeps running).
        proc.send_signal(1)
        status, _ = get(ns, 8443, "/healthz", tls=trusted)
        assert status == 200 and proc.poll() is None
    finally:
        stop(proc)
