"""The master process: loads the config, opens the listening sockets, forks the workers and supervises
them. It never handles traffic.

Workers inherit the listening sockets (one accept queue per address, shared by every worker). A reload
forks a new generation on the same sockets before asking the old one to drain, so the accept queue is
never without a reader and no connection is refused during the swap.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time

from bastion.config.compile import load_runtime
from bastion.config.loader import ConfigError
from bastion.config.schema import split_host_port
from bastion.security.shared import MAX_ROWS, clear_worker_row, set_worker_row

log = logging.getLogger("bastion.master")

RESPAWN_BACKOFF_MAX = 10.0


def print_config_error(error: ConfigError, stream=None) -> None:
    stream = stream or sys.stderr
    for problem in error.problems:
        print(f"config error: {problem}", file=stream, flush=True)


def open_listener(address: str, default_host: str = "0.0.0.0") -> socket.socket:
    host, port = split_host_port(address, default_host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def worker_count(config) -> int:
    if config.workers == "auto":
        return os.cpu_count() or 1
    return int(config.workers)


class Master:
    def __init__(self, config_path: str):
        self.config_path = config_path
        self.runtime = None
        self.listen_sockets: dict[str, socket.socket] = {}
        self.admin_socket: socket.socket | None = None
        self.admin_address: str | None = None
        self.workers: dict[int, int] = {}  # pid -> generation
        self.worker_rows: dict[int, int] = {}  # pid -> its row in the node's shared counters (security)
        self.checkers: dict[int, int] = {}  # health checker pid -> generation
        self.acme_managers: dict[int, int] = {}  # ACME manager pid -> generation
        self.generation = 0
        self.stopping = False
        self.fast = False
        self.pid_file: str | None = None
        self.metrics_dir: str | None = None
        self.pending_signals: list[int] = []
        self.wake_r = self.wake_w = -1
        self.respawn_delay = 0.5

    # -- start ------------------------------------------------------------------------------------------
    def start(self) -> int:
        try:
            self.runtime = load_runtime(self.config_path)
        except ConfigError as exc:
            print_config_error(exc)
            return 2
        config = self.runtime.config
        configure_logging(config.log)
        _raise_open_files_limit()
        self.metrics_dir = tempfile.mkdtemp(prefix="bastion-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        try:
            self._open_sockets(config)
        except OSError as exc:
            log.error("%s", exc)
            print(f"bastion: {exc}", file=sys.stderr, flush=True)
            self._cleanup()
            return 1
        self.pid_file = config.pid_file
        if self.pid_file:
            with open(self.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        self._install_signals()
        n = worker_count(config)
        self.generation = 1
        for _ in range(n):
            self._spawn(self.generation)
        self._spawn_checker(self.generation)
        self._spawn_acme(self.generation)
        listening = ", ".join(self.listen_sockets)
        log.info("bastion %s listening on %s with %d worker%s%s", _version(), listening, n, "s" if n != 1 else "",
                 f", admin on {self.admin_address}" if self.admin_address else "")
        try:
            return self._supervise()
        finally:
            self._cleanup()

    def _open_sockets(self, config) -> None:
        wanted = [listener.address for listener in config.listeners]
        new: dict[str, socket.socket] = {}
        try:
            for address in wanted:
                if address in new:
                    continue
                sock = self.listen_sockets.get(address)
                if sock is None:
                    try:
                        sock = open_listener(address)
                    except OSError as exc:
                        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
                new[address] = sock
            admin = config.admin.address if config.admin is not None else None
            admin_sock = self.admin_socket if admin == self.admin_address else None
            if admin is not None and admin_sock is None:
                try:
                    admin_sock = open_listener(admin, "127.0.0.1")
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen on admin address {admin}: {exc.strerror}") from None
        except OSError:
            for address, sock in new.items():
                if self.listen_sockets.get(address) is not sock:
                    sock.close()
            raise
        for address, sock in self.listen_sockets.items():
            if new.get(address) is not sock:
                sock.close()
        if self.admin_socket is not None and self.admin_socket is not admin_sock:
            self.admin_socket.close()
        self.listen_sockets = new
        self.admin_socket = admin_sock
        self.admin_address = admin

    def _install_signals(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.pending_signals.append(signum)

    # -- workers ------------------------------------------------------------------------------------------
    def _fork(self, child_main) -> int:
        """Fork a child that runs `child_main()` with default signal handling and exits with its code."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                os.close(self.wake_r)
                os.close(self.wake_w)
                code = child_main()
            except Exception:  # noqa: BLE001 - reported by the master as an unexpected exit
                log.exception("child process failed")
            finally:
                logging.shutdown()
                os._exit(code)
        return pid

    def _spawn(self, generation: int) -> None:
        runtime = self.runtime
        sockets = list(self.listen_sockets.items())
        admin = self.admin_socket
        master_pid = os.getpid()
        used = set(self.worker_rows.values())
        row = next((r for r in range(MAX_ROWS) if r not in used), len(self.worker_rows) % MAX_ROWS)

        def worker_main() -> int:
            from bastion.server.worker import run_worker

            set_worker_row(row)
            return run_worker(runtime, sockets, admin, master_pid, generation)

        pid = self._fork(worker_main)
        self.workers[pid] = generation
        self.worker_rows[pid] = row

    def _spawn_checker(self, generation: int) -> None:
        """One active health checker per node and generation, when the configuration asks for checks."""
        runtime = self.runtime
        if not runtime.checked:
            return
        sockets = list(self.listen_sockets.values()) + ([self.admin_socket] if self.admin_socket else [])

        def checker_main() -> int:
            for sock in sockets:
                sock.close()  # the checker serves no traffic
            from bastion.upstream.health import run_checker

            return run_checker(runtime)

        self.checkers[self._fork(checker_main)] = generation

    def _spawn_acme(self, generation: int) -> None:
        """One ACME manager per node and generation, when listeners ask for ACME certificates."""
        runtime = self.runtime
        if not runtime.acme_names:
            return
        sockets = list(self.listen_sockets.values()) + ([self.admin_socket] if self.admin_socket else [])

        def acme_main() -> int:
            for sock in sockets:
                sock.close()
            from bastion.tls.acme import run_manager

            return run_manager(runtime.config.acme, runtime.acme_names)

        self.acme_managers[self._fork(acme_main)] = generation

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.checkers:
                generation = self.checkers.pop(pid)
                if generation == self.generation and not self.stopping:
                    log.error("health checker %d exited unexpectedly; starting a new one", pid)
                    time.sleep(0.5)
                    self._spawn_checker(self.generation)
                continue
            if pid in self.acme_managers:
                generation = self.acme_managers.pop(pid)
                if generation == self.generation and not self.stopping:
                    log.error("acme manager %d exited unexpectedly; starting a new one", pid)
                    time.sleep(0.5)
                    self._spawn_acme(self.generation)
                continue
            generation = self.workers.pop(pid, None)
            if generation is None:
                continue
            self._forget_worker_metrics(pid)
            row = self.worker_rows.pop(pid, None)
            if row is not None and row not in self.worker_rows.values():
                clear_worker_row(row)  # its connections and in-flight requests are gone with it
            code = os.waitstatus_to_exitcode(status)
            if generation == self.generation and not self.stopping:
                log.error("worker %d exited unexpectedly (%s); starting a new one", pid, _describe_exit(code))
                time.sleep(min(self.respawn_delay, RESPAWN_BACKOFF_MAX))
                self.respawn_delay = min(self.respawn_delay * 2, RESPAWN_BACKOFF_MAX)
                self._spawn(self.generation)
            else:
                log.debug("worker %d of generation %d exited (%s)", pid, generation, _describe_exit(code))

    def _forget_worker_metrics(self, pid: int) -> None:
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)
        except Exception:  # noqa: BLE001 - only live gauges are affected
            pass

    # -- reload and stop ----------------------------------------------------------------------------------
    def reload(self) -> None:
        log.info("reloading %s", self.config_path)
        try:
            runtime = load_runtime(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config error: %s", problem)
            print_config_error(exc)
            log.error("reload refused; still serving the previous configuration")
            return
        old_runtime = self.runtime
        from bastion.upstream.health import carry_over

        carry_over(old_runtime, runtime)
        self.runtime = runtime
        try:
            self._open_sockets(runtime.config)
        except OSError as exc:
            log.error("reload refused: %s; still serving the previous configuration", exc)
            print(f"bastion: reload refused: {exc}", file=sys.stderr, flush=True)
            self.runtime = old_runtime
            return
        configure_logging(runtime.config.log)
        old = [pid for pid, gen in self.workers.items() if gen == self.generation]
        old += [pid for pid, gen in self.checkers.items() if gen == self.generation]
        old += [pid for pid, gen in self.acme_managers.items() if gen == self.generation]
        self.generation += 1
        for _ in range(worker_count(runtime.config)):
            self._spawn(self.generation)
        self._spawn_checker(self.generation)
        self._spawn_acme(self.generation)
        for pid in old:
            _signal(pid, signal.SIGTERM)
        self.respawn_delay = 0.5
        log.info("reloaded: generation %d serving, %d old worker(s) draining", self.generation, len(old))

    def _stop(self, fast: bool) -> None:
        if self.stopping and not fast:
            return
        self.stopping = True
        self.fast = self.fast or fast
        for pid in list(self.workers) + list(self.checkers) + list(self.acme_managers):
            _signal(pid, signal.SIGINT if fast else signal.SIGTERM)
        for sock in self.listen_sockets.values():
            sock.close()
        self.listen_sockets = {}
        if self.admin_socket is not None:
            self.admin_socket.close()
            self.admin_socket = None

    def _certificate_files(self) -> dict[str, float]:
        files = {}
        for path in self.runtime.cert_files:
            try:
                files[path] = os.stat(path).st_mtime
            except OSError:
                files[path] = -1.0
        return files

    def _supervise(self) -> int:
        stop_deadline = None
        cert_files = self._certificate_files()
        next_cert_check = time.monotonic() + 2
        while True:
            if not self.stopping and time.monotonic() >= next_cert_check:
                # Renewed certificates are picked up without a manual reload.
                next_cert_check = time.monotonic() + 2
                current = self._certificate_files()
                if current != cert_files:
                    log.info("certificate files changed; reloading")
                    self.reload()
                    cert_files = self._certificate_files()
            if self.pending_signals:
                signals, self.pending_signals = self.pending_signals, []
                for sig in signals:
                    if sig == signal.SIGCHLD:
                        self._reap()
                    elif sig == signal.SIGHUP and not self.stopping:
                        self.reload()
                    elif sig == signal.SIGTERM:
                        if self.stopping:
                            self._stop(fast=True)
                        else:
                            log.info("shutting down: draining in-flight requests")
                            self._stop(fast=False)
                            stop_deadline = time.monotonic() + self.runtime.config.timeouts.drain + 5
                    elif sig in (signal.SIGINT, signal.SIGQUIT):
                        self._stop(fast=True)
                        stop_deadline = time.monotonic() + 5
            self._reap()
            if self.stopping and not self.workers and not self.checkers and not self.acme_managers:
                log.info("stopped")
                return 0
            if stop_deadline is not None and time.monotonic() > stop_deadline:
                for pid in list(self.workers) + list(self.checkers) + list(self.acme_managers):
                    _signal(pid, signal.SIGKILL)
                stop_deadline = time.monotonic() + 5
            try:
                select.select([self.wake_r], [], [], 1.0)
            except InterruptedError:
                pass
            try:
                while os.read(self.wake_r, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def _cleanup(self) -> None:
        for sock in self.listen_sockets.values():
            sock.close()
        if self.admin_socket is not None:
            self.admin_socket.close()
        if self.pid_file:
            try:
                with open(self.pid_file) as f:
                    if f.read().strip() == str(os.getpid()):
                        os.unlink(self.pid_file)
            except OSError:
                pass
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _raise_open_files_limit() -> None:
    """Each client connection is a file descriptor: a worker holding thousands of them (slow clients
    included) needs more than the usual soft limit of 1024. The hard limit is as far as we may go."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError) as exc:
        log.warning("cannot raise the open files limit: %s", exc)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _version() -> str:
    import bastion

    return f"{bastion.__version__} (hot path {'compiled' if bastion.COMPILED else 'interpreted'})"


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record):
        record.pid = os.getpid()
        return super().format(record)


def configure_logging(settings) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if settings.path in ("stderr", "stdout"):
        handler = logging.StreamHandler(sys.stderr if settings.path == "stderr" else sys.stdout)
    else:
        handler = logging.FileHandler(settings.path)
    handler.setFormatter(_Formatter("%(asctime)s.%(msecs)03dZ bastion[%(pid)d] %(levelname)s %(message)s",
                                    "%Y-%m-%dT%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(settings.level.upper())
