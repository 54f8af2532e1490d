"""The one helper that starts a private redis-server for a test: `PrivateRedis`, and a
Redis Cluster of them on loopback: `PrivateRedisCluster`.

On a free loopback port, nothing persisted (unless ``stop(save=True)``), optionally with a
password for the default user and ACL users (AUTH), and optionally TLS only (``port 0``,
``tls-port``; certificates from `trustme`, see `RedisTLS`). The configuration is fed to
``redis-server -`` on stdin, so no password is on a command line (``ps``) or in a file the
whole-suite secrets scan would then find.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from tests._ports import free_port

__all__ = [
    "KEYBRAKE_ACL_COMMANDS",
    "KEYBRAKE_CLUSTER_ACL_COMMANDS",
    "REDIS_ACL_PASSWORD",
    "REDIS_ACL_USER",
    "REDIS_ADMIN_PASSWORD",
    "PrivateRedis",
    "PrivateRedisCluster",
    "RedisTLS",
    "keybrake_acl",
    "port_open",
]

#: The default user's password (``requirepass``) of servers started with ``password=``.
REDIS_ADMIN_PASSWORD = "kb-test-redis-admin-" + "c81f4e02a7d95b36"
#: The ACL user the proxy logs in as, allowed only `KEYBRAKE_ACL_COMMANDS`.
REDIS_ACL_USER = "keybrake"
REDIS_ACL_PASSWORD = "kb-test-redis-acl-" + "5e3a9d17b06c42f8"
#: Every command the store sends, in the words of the README's ``ACL SETUSER`` line.
KEYBRAKE_ACL_COMMANDS = (
    "-@all +ping +time +select +get +set +del +exists +expire +pexpire "
    "+hget +hgetall +hmget +hset +hsetnx +hdel +hincrby +zadd +zrem +zrevrange "
    "+zrangebyscore +zrange +zcard +zremrangebyscore +pexpireat +pttl +scan "
    "+sadd +srem +smembers +xadd +xrange +xreadgroup +xautoclaim +xack +xdel +xpending +xtrim "
    "+xlen +xgroup|create "
    "+multi +exec +evalsha +script|load"
)

#: What a Redis Cluster's ACL user needs besides: topology discovery and redis-py's command table.
KEYBRAKE_CLUSTER_ACL_COMMANDS = "+cluster|slots +command"


def keybrake_acl(user: str, password: str, key_pattern: str) -> str:
    """The ``user …`` config line of the store's ACL user, as the README gives it."""
    return (
        f"user {user} on >{password} resetkeys ~{key_pattern} resetchannels "
        + KEYBRAKE_ACL_COMMANDS
    )


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass(frozen=True)
class RedisTLS:
    """A CA, a server certificate (127.0.0.1 and localhost) and a client certificate."""

    ca_pem: Path
    server_pem: Path
    server_key: Path
    client_pem: Path
    client_key: Path

    @classmethod
    def make(
        cls, directory: Path, server_names: Sequence[str] = ("127.0.0.1", "localhost")
    ) -> RedisTLS:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="Keybrake test Redis CA")
        server = ca.issue_cert(*server_names)
        client = ca.issue_cert("keybrake-proxy.test")
        tls = cls(
            ca_pem=directory / "ca.pem",
            server_pem=directory / "server.pem",
            server_key=directory / "server.key",
            client_pem=directory / "client.pem",
            client_key=directory / "client.key",
        )
        ca.cert_pem.write_to_path(str(tls.ca_pem))
        server.cert_chain_pems[0].write_to_path(str(tls.server_pem))
        server.private_key_pem.write_to_path(str(tls.server_key))
        client.cert_chain_pems[0].write_to_path(str(tls.client_pem))
        client.private_key_pem.write_to_path(str(tls.client_key))
        return tls

    def query(self, *, client_cert: bool = True, ca_pem: Path | None = None) -> str:
        """The store URL's TLS options: this CA (or ``ca_pem``) and the client certificate."""
        query = f"ssl_ca_certs={ca_pem or self.ca_pem}"
        if client_cert:
            query += f"&ssl_certfile={self.client_pem}&ssl_keyfile={self.client_key}"
        return query


class PrivateRedis:
    """A redis-server of our own on a free loopback port.

    ``password`` sets the default user's (``requirepass``; `cli` uses it), ``users`` adds ACL
    ``user …`` lines, ``tls`` serves TLS only (client certificates required unless
    ``tls_auth_clients`` says otherwise), ``config`` adds more config lines. The RDB file in
    ``workdir`` survives ``stop(save=True)``/``start()``.

    Example::

        r = PrivateRedis(tmp_path, password=REDIS_ADMIN_PASSWORD)
        r.start()
        try:
            store = open_store(f"redis://:{REDIS_ADMIN_PASSWORD}@127.0.0.1:{r.port}/0")
        finally:
            r.kill()
    """

    def __init__(
        self,
        workdir: Path,
        *,
        password: str | None = None,
        users: Sequence[str] = (),
        tls: RedisTLS | None = None,
        tls_auth_clients: str = "yes",
        config: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.port = free_port() if port is None else port
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pidfile = workdir / f"redis-{self.port}.pid"
        self.logfile = workdir / f"redis-{self.port}.log"
        self.password = password
        self.users = list(users)
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.config = list(config)

    @property
    def url(self) -> str:
        """The server's URL without credentials or TLS options."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            'save ""',
            "appendonly no",
            "daemonize yes",
            f"pidfile {self.pidfile}",
            f"logfile {self.logfile}",
            f"dir {self.dir}",
            "dbfilename dump.rdb",
        ]
        if self.tls is None:
            lines.append(f"port {self.port}")
        else:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f"tls-cert-file {self.tls.server_pem}",
                f"tls-key-file {self.tls.server_key}",
                f"tls-ca-cert-file {self.tls.ca_pem}",
                f"tls-auth-clients {self.tls_auth_clients}",
            ]
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        return "\n".join([*lines, *self.users, *self.config, ""])

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``redis-cli`` as the default user (its password by environment, not argument)."""
        tls: list[str] = []
        if self.tls is not None:
            tls = ["--tls", "--cacert", str(self.tls.ca_pem)]
            tls += ["--cert", str(self.tls.client_pem), "--key", str(self.tls.client_key)]
        env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
        if self.password is not None:
            env["REDISCLI_AUTH"] = self.password
        return subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *tls, *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            env=env,
        )

    def start(self, *, empty: bool = False) -> PrivateRedis:
        rdb = self.dir / "dump.rdb"
        if empty and rdb.exists():
            rdb.unlink()
        subprocess.run(
            ["redis-server", "-"],
            input=self._config(),
            text=True,
            check=True,
            capture_output=True,
            timeout=10,
        )
        _wait_for(lambda: port_open(self.port), 10, f"redis-server on port {self.port}")
        _wait_for(lambda: self.cli("PING").stdout.strip() == "PONG", 10, "redis to load")
        return self

    def stop(self, *, save: bool = False) -> None:
        self.cli("SHUTDOWN", "SAVE" if save else "NOSAVE")
        _wait_for(lambda: not port_open(self.port), 10, "redis to stop")

    def kill(self) -> None:
        """Stop it however it is (the fixture finaliser): SHUTDOWN, then SIGKILL by pid."""
        if port_open(self.port):
            self.cli("SHUTDOWN", "NOSAVE")
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(self.pidfile.read_text().strip()), signal.SIGKILL)


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) is free and valid too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class PrivateRedisCluster:
    """A Redis Cluster of `PrivateRedis` servers on loopback: ``masters`` masters with
    ``replicas`` replicas each (``cluster-enabled yes``, each node in its own directory, nothing
    persisted), made with ``redis-cli --cluster create``.

    ``cluster-node-timeout`` is ``node_timeout_ms``: a killed master's replica takes over
    about that long (plus an election) after the kill. ``password``, ``users`` and ``tls``
    are every node's (see `PrivateRedis`; with TLS the cluster bus is TLS too), and so are
    the ``config`` lines (they come last: ``appendonly yes`` wins over the default ``no``).

    Example::

        cluster = PrivateRedisCluster(tmp_path).start()
        try:
            store = open_store(cluster.url + "?prefix=kb:")
            cluster.kill_master_of("some-key")
        finally:
            cluster.kill()
    """

    def __init__(
        self,
        workdir: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        password: str | None = None,
        users: Sequence[str] = (),
        tls: RedisTLS | None = None,
        config: Sequence[str] = (),
    ) -> None:
        self.replicas = replicas
        self.tls = tls
        self.nodes = [
            PrivateRedis(
                workdir / f"node{i}",
                port=_cluster_port(),
                password=password,
                users=users,
                tls=tls,
                config=[
                    "cluster-enabled yes",
                    f"cluster-config-file nodes-{i}.conf",
                    f"cluster-node-timeout {node_timeout_ms}",
                    # A master without a replica may answer for its slots again once it is
                    # back (the restart path when there are no replicas).
                    "cluster-require-full-coverage yes",
                    # A replica logs in to its master as the default user.
                    *([f"masterauth {password}"] if password is not None else []),
                    # TLS only: the cluster bus and replication too.
                    *(["tls-cluster yes", "tls-replication yes"] if tls is not None else []),
                    *config,
                ],
            )
            for i in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """The store URL naming every node (no options)."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes) + "/0"

    def start(self) -> PrivateRedisCluster:
        for node in self.nodes:
            node.start()
        if len(self.nodes) == 1:
            # One master (a baseline for benchmarks): redis-cli --cluster wants three.
            self.nodes[0].cli("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
            self.wait_ok()
            return self
        made = self.nodes[0].cli(
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in self.nodes),
            "--cluster-replicas",
            str(self.replicas),
            "--cluster-yes",
        )
        if made.returncode != 0:
            self.kill()
            raise AssertionError(f"redis-cli --cluster create failed: {made.stdout}{made.stderr}")
        self.wait_ok()
        # A replica that has not synced with its master yet would not take over (its data is
        # "too old"), and a test that kills a master right after the start would wait for a
        # failover that never comes: every replica's link must be up first.
        _wait_for(
            lambda: all(
                "master_link_status:up" in n.cli("INFO", "replication").stdout
                for n in self.nodes
                if "role:slave" in n.cli("INFO", "replication").stdout
            ),
            30,
            "every replica to sync with its master",
        )
        return self

    def _state_ok(self, node: PrivateRedis) -> bool:
        info = node.cli("CLUSTER", "INFO").stdout
        return "cluster_state:ok" in info and "cluster_slots_ok:16384" in info

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every live node says the cluster is whole (every slot served)."""
        _wait_for(
            lambda: all(self._state_ok(n) for n in self.nodes if port_open(n.port)),
            timeout,
            "the cluster to be ok",
        )

    def masters(self) -> list[PrivateRedis]:
        """The live nodes that are masters now."""
        return [
            n
            for n in self.nodes
            if port_open(n.port) and "role:master" in n.cli("INFO", "replication").stdout
        ]

    def master_of(self, key: str) -> PrivateRedis:
        """The node serving ``key``'s slot now."""
        slot = int(self.nodes[0].cli("CLUSTER", "KEYSLOT", key).stdout.strip())
        for node in self.masters():
            for line in node.cli("CLUSTER", "NODES").stdout.splitlines():
                fields = line.split()
                if "myself" in fields[2]:
                    for served in fields[8:]:
                        low, _, high = served.partition("-")
                        if not low.startswith("[") and int(low) <= slot <= int(high or low):
                            return node
        raise AssertionError(f"no master serves slot {slot}")

    def kill_node(self, node: PrivateRedis) -> None:
        """SIGKILL the node's process (no SHUTDOWN: a crash)."""
        os.kill(int(node.pidfile.read_text().strip()), signal.SIGKILL)
        _wait_for(lambda: not port_open(node.port), 10, "the node to die")

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
