"""`make bench`: Bastion against nginx and HAProxy, in one run, on this machine.

A fixed nginx backend serves a 1 KiB body, a cacheable 1 KiB body and a 64 MiB file, and stores 64 MiB
uploads (a WebDAV PUT into a tmpfs folder). In front of it: Bastion with one worker, nginx with one worker, HAProxy with one thread, all
with upstream keep-alive. The proxy under test is pinned to CPU 0; the load generator and the backend to
CPU 1. Every figure is the median of BENCH_RUNS interleaved runs (proxy A, B, C, A, B, C, ...) with the
spread. Scenarios a proxy cannot do (yet) print n/a. Results go to bench/results/<time>.json.

Environment: BENCH_RUNS (default 3), BENCH_SECONDS (default 5), BENCH_QUICK=1 (1 run of 2 s).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASTION = ROOT / ".venv" / "bin" / "bastion"
PYTHON = ROOT / ".venv" / "bin" / "python"
QUICK = os.environ.get("BENCH_QUICK") == "1"
RUNS = 1 if QUICK else int(os.environ.get("BENCH_RUNS", "3"))
SECONDS = 2 if QUICK else int(os.environ.get("BENCH_SECONDS", "5"))
TRANSFERS_PER_RUN = 1 if QUICK else 3  # scenario 4's transfers per run (see there)
PROXY_CPU = "0"
LOAD_CPU = "1" if (os.cpu_count() or 1) > 1 else "0"
PROXIES = ("bastion", "nginx", "haproxy")
# The Python floor: bench/bare_forwarder.py, measured beside the proxies in the pass-through scenarios
WITH_FLOOR = PROXIES + ("floor",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def cpu_ns(pid: int) -> int:
    """CPU time the process has run, in ns (the scheduler's own count: a 64 MiB transfer takes tens of ms,
    too short for the 10 ms ticks of cpu_ticks)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Proc:
    """A started process group, always cleaned up."""

    def __init__(self, name: str, args: list[str], cpu: str, env: dict | None = None, cwd: str | None = None):
        self.name = name
        self.proc = subprocess.Popen(["taskset", "-c", cpu, *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class Bench:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
        # Uploads are stored in memory (tmpfs), so the disk plays no part in the upload figure.
        shm = Path("/dev/shm")
        self.uploads = Path(tempfile.mkdtemp(prefix="bastion-bench-uploads-", dir=shm if shm.is_dir() else None))
        self.uploads.chmod(0o777)  # the backend's workers run as nobody and write there
        self.tmp.chmod(0o755)  # nginx workers run as nobody and must read the document root
        self.procs: list[Proc] = []
        self.ports: dict[str, int] = {}
        self.tls_ports: dict[str, int] = {}
        self.workers: dict[str, int] = {}  # the process that does the work, per proxy
        self.notes: list[str] = []

    # -- setup --------------------------------------------------------------------------------------------
    def start(self, name, args, cpu, port, env=None, cwd=None) -> Proc:
        p = Proc(name, args, cpu, env, cwd)
        self.procs.append(p)
        if not wait_port(port, 15):
            err = p.proc.stderr.read().decode(errors="replace") if p.proc.poll() is not None else "not listening"
            raise RuntimeError(f"{name} did not start: {err[-2000:]}")
        return p

    def temp_paths(self, name: str) -> str:
        d = self.tmp / name
        d.mkdir(exist_ok=True)
        return " ".join(f"{k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))

    def setup(self) -> None:
        docroot = self.tmp / "www"
        docroot.mkdir()
        (docroot / "1k").write_bytes(b"a" * 1024)
        (docroot / "cache").write_bytes(b"c" * 1024)
        with open(docroot / "64m", "wb") as f:
            f.write(os.urandom(1 << 20) * 64)
        self.upload_file = docroot / "64m"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                        "-keyout", str(self.tmp / "key.pem"), "-out", str(self.tmp / "cert.pem")],
                       check=True, capture_output=True)
        (self.tmp / "both.pem").write_bytes((self.tmp / "cert.pem").read_bytes() + (self.tmp / "key.pem").read_bytes())

        self.backend = free_port()
        conf = self.tmp / "backend.conf"
        conf.write_text(f"""
worker_processes 1; daemon off; pid {self.tmp}/backend.pid; error_log {self.tmp}/backend.err;
events {{ worker_connections 20000; }}
http {{ access_log off; {self.temp_paths("backend")} keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{self.backend}; root {docroot};
    location = /1k {{ default_type text/plain; }}
    location = /cache {{ default_type text/plain; add_header Cache-Control "public, max-age=600"; }}
    location = /64m {{ default_type application/octet-stream; }}
    location = /upload {{ root {self.uploads}; dav_methods PUT; client_max_body_size 100m;
      client_body_buffer_size 1m; client_body_temp_path {self.uploads}/tmp; }}
  }} }}""")
        self.start("backend", ["nginx", "-c", str(conf)], LOAD_CPU, self.backend)
        probe = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{self.backend}/1k"],
                               capture_output=True, text=True).stdout
        if probe != "200":
            raise RuntimeError(f"the backend answers {probe} for /1k")

        # nginx as the proxy
        port, tls = free_port(), free_port()
        conf = self.tmp / "nginx-proxy.conf"
        conf.write_text(f"""
worker_processes 1; worker_rlimit_nofile 20000; daemon off; pid {self.tmp}/proxy.pid; error_log {self.tmp}/proxy.err;
events {{ worker_connections 19000; }}
http {{ access_log off; {self.temp_paths("nginx")} keepalive_requests 1000000;
  proxy_cache_path {self.tmp}/nginx-cache keys_zone=c:10m;
  upstream b {{ server 127.0.0.1:{self.backend}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port}; listen 127.0.0.1:{tls} ssl http2;
    ssl_certificate {self.tmp}/cert.pem; ssl_certificate_key {self.tmp}/key.pem;
    client_max_body_size 100m; proxy_request_buffering off; proxy_buffering on;
    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    location = /cache {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_cache c; }}
  }} }}""")
        p = self.start("nginx", ["nginx", "-c", str(conf)], PROXY_CPU, port)
        self.ports["nginx"], self.tls_ports["nginx"] = port, tls
        time.sleep(0.3)
        self.workers["nginx"] = children(p.proc.pid)[0] if children(p.proc.pid) else p.proc.pid

        # HAProxy
        port, tls = free_port(), free_port()
        conf = self.tmp / "haproxy.cfg"
        conf.write_text(f"""
global
  nbthread 1
  maxconn 9990
  tune.ssl.default-dh-param 2048
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
cache c
  total-max-size 16
  max-age 600
frontend f
  bind 127.0.0.1:{port}
  bind 127.0.0.1:{tls} ssl crt {self.tmp}/both.pem alpn h2,http/1.1
  use_backend cached if {{ path /cache }}
  default_backend b
backend b
  server s1 127.0.0.1:{self.backend}
backend cached
  http-request cache-use c
  http-response cache-store c
  server s1 127.0.0.1:{self.backend}
""")
        p = self.start("haproxy", ["haproxy", "-f", str(conf)], PROXY_CPU, port)
        self.ports["haproxy"], self.tls_ports["haproxy"] = port, tls
        self.workers["haproxy"] = p.proc.pid

        # Bastion: examples/bench.yaml plus an HTTPS listener with the same certificate as the peers
        port, tls = free_port(), free_port()
        env = dict(os.environ, BASTION_LISTEN=f"127.0.0.1:{port}", BASTION_UPSTREAM=f"127.0.0.1:{self.backend}",
                   BASTION_WORKERS="1")
        conf = self.tmp / "bastion.yaml"
        conf.write_text(f"""include: [{ROOT / "examples" / "bench.yaml"}]
listeners:
  - address: "127.0.0.1:{tls}"
    tls: {{certificates: [{{cert: "{self.tmp}/cert.pem", key: "{self.tmp}/key.pem"}}]}}
""")
        p = self.start("bastion", [str(BASTION), "run", "-c", str(conf)], PROXY_CPU, port, env=env, cwd=str(self.tmp))
        self.ports["bastion"], self.tls_ports["bastion"] = port, tls
        deadline = time.monotonic() + 10
        while not children(p.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.workers["bastion"] = children(p.proc.pid)[0]
        port = free_port()
        p = self.start("floor", [str(PYTHON), str(ROOT / "bench" / "bare_forwarder.py"), str(port), str(self.backend)],
                       PROXY_CPU, port)
        self.ports["floor"] = port
        self.workers["floor"] = p.proc.pid
        self.bastion_has_cache = (ROOT / "examples" / "bench-cache.yaml").exists()
        if self.bastion_has_cache:
            # The cache scenario runs against its own Bastion (examples/bench-cache.yaml), so the other
            # scenarios measure the plain configuration.
            port = free_port()
            env = dict(env, BASTION_LISTEN=f"127.0.0.1:{port}")
            p = self.start("bastion-cache", [str(BASTION), "run", "-c", str(ROOT / "examples" / "bench-cache.yaml")],
                           PROXY_CPU, port, env=env, cwd=str(self.tmp))
            self.ports["bastion-cache"] = port
            deadline = time.monotonic() + 10
            while not children(p.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.workers["bastion-cache"] = children(p.proc.pid)[0]

    def setup_waf(self) -> None:
        """Scenario 8's proxies: Bastion with the WAF on, and nginx + ModSecurity (Debian's
        libnginx-mod-http-modsecurity) loading the very rule files Bastion generates: CRS 3.3.4, paranoia 1,
        block mode, no audit log in either."""
        sys.path.insert(0, str(ROOT))
        from bastion.config.schema import Waf
        from bastion.security.waf import effective_settings, rule_files

        settings = effective_settings(Waf(mode="block", paranoia_level=1, audit_log=None), None)
        rules_dir = self.tmp / "waf-rules"
        rules_dir.mkdir()
        modsec = self.tmp / "modsecurity.conf"
        modsec.write_text("".join(f"Include {f}\n" for f in rule_files(settings, str(rules_dir))))

        port = free_port()
        env = dict(os.environ, BASTION_LISTEN=f"127.0.0.1:{port}", BASTION_UPSTREAM=f"127.0.0.1:{self.backend}",
                   BASTION_WORKERS="1")
        conf = self.tmp / "bastion-waf.yaml"
        conf.write_text(f"""include: [{ROOT / "examples" / "bench.yaml"}]
waf: {{mode: block, paranoia_level: 1, audit_log: null}}
""")
        p = self.start("bastion-waf", [str(BASTION), "run", "-c", str(conf)], PROXY_CPU, port, env=env, cwd=str(self.tmp))
        self.ports["bastion-waf"] = port
        deadline = time.monotonic() + 10
        while not children(p.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.workers["bastion-waf"] = children(p.proc.pid)[0]

        module = "/usr/lib/nginx/modules/ngx_http_modsecurity_module.so"
        if not Path(module).exists():
            self.notes.append("nginx + ModSecurity: libnginx-mod-http-modsecurity is not installed")
            return
        port = free_port()
        conf = self.tmp / "nginx-waf.conf"
        conf.write_text(f"""
load_module {module};
worker_processes 1; worker_rlimit_nofile 20000; daemon off; pid {self.tmp}/nginx-waf.pid; error_log {self.tmp}/nginx-waf.err;
events {{ worker_connections 19000; }}
http {{ access_log off; {self.temp_paths("nginx-waf")} keepalive_requests 1000000;
  upstream b {{ server 127.0.0.1:{self.backend}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port};
    modsecurity on; modsecurity_rules_file {modsec};
    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }} }}""")
        p = self.start("nginx-waf", ["nginx", "-c", str(conf)], PROXY_CPU, port)
        self.ports["nginx-waf"] = port
        time.sleep(0.3)
        self.workers["nginx-waf"] = children(p.proc.pid)[0] if children(p.proc.pid) else p.proc.pid

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.uploads, ignore_errors=True)

    # -- load generators ----------------------------------------------------------------------------------
    def wrk(self, url: str, connections: int = 50, seconds: int = SECONDS, script: str | None = None,
            pid: int | None = None) -> dict:
        args = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
        if script:
            args += ["-s", script]
        t0 = cpu_ticks(pid) if pid else 0
        out = subprocess.run(args + [url], capture_output=True, text=True, timeout=seconds + 30).stdout
        t1 = cpu_ticks(pid) if pid else 0
        result = {"rps": _wrk_value(out, r"Requests/sec:\s+([\d.]+)"), "p50_ms": _wrk_latency(out, "50%"),
                  "p99_ms": _wrk_latency(out, "99%"), "errors": _wrk_errors(out)}
        total = _wrk_value(out, r"(\d+) requests in")
        if pid and total:
            result["cpu_us_per_req"] = (t1 - t0) * (1e6 / os.sysconf("SC_CLK_TCK")) / total
        return result

    def h2load(self, url: str, seconds: int = SECONDS) -> dict:
        args = ["taskset", "-c", LOAD_CPU, "h2load", "-c", "20", "-m", "10", "-D", str(seconds), url]
        out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 30).stdout
        m = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
        failed = re.search(r"(\d+) failed", out)
        return {"rps": float(m.group(1)) if m else None, "errors": int(failed.group(1)) if failed else None}

    def curl_speed(self, args: list[str]) -> float | None:
        out = subprocess.run(["taskset", "-c", LOAD_CPU, "curl", "-s", "-o", "/dev/null", *args], capture_output=True,
                             text=True, timeout=120).stdout
        try:
            return float(out.strip()) / 1e6
        except ValueError:
            return None

    def transfer(self, name: str, args: list[str]) -> tuple[float | None, float]:
        """curl_speed through a proxy, and the CPU (ms) the proxy's worker spent meanwhile."""
        pid = self.workers[name]
        before = cpu_ns(pid)
        speed = self.curl_speed(args)
        return speed, (cpu_ns(pid) - before) / 1e6

    def idle_rss(self, name: str, n: int = 10000) -> dict:
        pid = self.workers[name]
        script = ROOT / "bench" / "idle_connections.py"
        out = subprocess.run(["taskset", "-c", LOAD_CPU, str(PYTHON), str(script), str(self.ports[name]), str(pid), str(n)],
                             capture_output=True, text=True, timeout=180)
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"error": (out.stderr or out.stdout)[-500:]}


def _wrk_value(out: str, pattern: str):
    m = re.search(pattern, out)
    return float(m.group(1)) if m else None


def _wrk_latency(out: str, pct: str):
    m = re.search(rf"^\s+{re.escape(pct)}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not m:
        return None
    value = float(m.group(1))
    return {"us": value / 1000, "ms": value, "s": value * 1000}[m.group(2)]


def _wrk_errors(out: str) -> int:
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return errors + (int(m.group(1)) if m else 0)


def median_spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt(stat: dict | None, digits: int = 0) -> str:
    if stat is None:
        return "n/a"
    if stat["min"] == stat["max"]:
        return f"{stat['median']:.{digits}f}"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def ratio(a: dict | None, b: dict | None, invert: bool = False) -> str:
    if not a or not b or not b["median"] or not a["median"]:
        return "n/a"
    r = b["median"] / a["median"] if invert else a["median"] / b["median"]
    return f"{r:.2f}×"


def difference(a: dict | None, b: dict | None) -> str:
    if not a or not b or a["median"] is None or b["median"] is None:
        return "n/a"
    return f"{a['median'] - b['median']:+.3f} ms"


def main() -> int:
    bench = Bench()
    results: dict = {"scenarios": {}}
    try:
        print(f"Setting up (temporary files in {bench.tmp}) ...", flush=True)
        bench.setup()
        print(f"Pinning: proxies on CPU {PROXY_CPU}; wrk, h2load, curl and the backend on CPU {LOAD_CPU}. "
              f"{RUNS} interleaved run(s) of {SECONDS} s per figure. {versions()['bastion']}.\n", flush=True)
        sc = results["scenarios"]

        def per_proxy(fn, names=PROXIES, repeat=1):
            runs = {n: [] for n in names}
            for _ in range(RUNS * repeat):
                for n in names:
                    runs[n].append(fn(n))
            return runs

        # 1. pass-through, keep-alive, 50 connections
        print("1. 1 KiB pass-through, 50 keep-alive connections ...", flush=True)
        for n in WITH_FLOOR:  # warm up pools and caches
            bench.wrk(f"http://127.0.0.1:{bench.ports[n]}/1k", seconds=1)
        runs = per_proxy(lambda n: bench.wrk(f"http://127.0.0.1:{bench.ports[n]}/1k", pid=bench.workers[n]), WITH_FLOOR)
        direct = [bench.wrk(f"http://127.0.0.1:{bench.backend}/1k") for _ in range(RUNS)]
        sc["passthrough"] = {n: {k: median_spread([r[k] for r in runs[n]]) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")}
                             | {"errors": sum(r["errors"] for r in runs[n])} for n in WITH_FLOOR}
        sc["passthrough"]["direct"] = {k: median_spread([r[k] for r in direct]) for k in ("rps", "p50_ms", "p99_ms")}

        def varied(name: str, lua: str) -> dict:
            """Scenario 1 with a wrk Lua script that varies the requests."""
            script = bench.tmp / name
            script.write_text(lua)
            runs = per_proxy(lambda n: bench.wrk(f"http://127.0.0.1:{bench.ports[n]}/1k", script=str(script),
                                                 pid=bench.workers[n]), WITH_FLOOR)
            return {n: {k: median_spread([r[k] for r in runs[n]]) for k in ("rps", "cpu_us_per_req")} for n in WITH_FLOOR}

        # 1b. the same with a target that never repeats: wrk sends one head over and over, which Bastion
        # recognises (bastion/http/known_heads.py); an API client asking for one item after another repeats
        # its fields with another target, which Bastion recognises by the head's shape
        print("1b. 1 KiB pass-through, every request target different ...", flush=True)
        sc["passthrough_unique"] = varied(
            "unique.lua", 'local n = 0\nrequest = function()\n  n = n + 1\n  return wrk.format("GET", "/1k?n=" .. n)\nend\n')

        # 1c. ... and a header field that never repeats either: every head goes through the parser
        print("1c. 1 KiB pass-through, every request head different (target and a field) ...", flush=True)
        sc["passthrough_fresh"] = varied(
            "fresh.lua", 'local n = 0\nrequest = function()\n  n = n + 1\n'
                         '  return wrk.format("GET", "/1k?n=" .. n, {["X-Seq"] = tostring(n)})\nend\n')

        # 2. added latency at a fixed moderate rate (half of nginx's maximum)
        rate = sc["passthrough"]["nginx"]["rps"]["median"] / 2
        connections = 50
        delay_ms = connections / rate * 1000
        script = bench.tmp / "paced.lua"
        script.write_text(f"function delay() return {delay_ms:.3f} end\n")
        print(f"2. added latency at ~{rate:.0f} req/s ({connections} connections, {delay_ms:.2f} ms between requests each) ...", flush=True)
        runs = per_proxy(lambda n: bench.wrk(f"http://127.0.0.1:{bench.ports[n]}/1k", connections, script=str(script)))
        direct = [bench.wrk(f"http://127.0.0.1:{bench.backend}/1k", connections, script=str(script)) for _ in range(RUNS)]
        d50 = statistics.median([r["p50_ms"] for r in direct])
        d99 = statistics.median([r["p99_ms"] for r in direct])
        sc["added_latency"] = {"rate": rate, "direct_p50_ms": d50, "direct_p99_ms": d99}
        for n in PROXIES:
            sc["added_latency"][n] = {"p50_ms": median_spread([r["p50_ms"] - d50 for r in runs[n]]),
                                      "p99_ms": median_spread([r["p99_ms"] - d99 for r in runs[n]]),
                                      "rps": median_spread([r["rps"] for r in runs[n]])}

        # 3. cache hits
        print("3. cache hits ...", flush=True)
        names = [n for n in PROXIES if n != "bastion" or bench.bastion_has_cache]
        cache_target = {n: ("bastion-cache" if n == "bastion" else n) for n in names}
        for n in names:  # fill the caches
            bench.wrk(f"http://127.0.0.1:{bench.ports[cache_target[n]]}/cache", seconds=1)
        runs = per_proxy(lambda n: bench.wrk(f"http://127.0.0.1:{bench.ports[cache_target[n]]}/cache",
                                             pid=bench.workers[cache_target[n]]), names)
        sc["cache_hits"] = {n: {"rps": median_spread([r["rps"] for r in runs[n]]) if n in runs else None} for n in PROXIES}

        # 4. 64 MiB download and upload
        print("4. 64 MiB download and upload ...", flush=True)
        # Straight from the backend first: a reference, and it keeps the first proxy measured from paying for
        # whatever the first large transfer after the small-request scenarios costs the machine.
        # A transfer takes 30-80 ms, and single transfers vary by 2x on this machine: each figure is the median of
        # TRANSFERS_PER_RUN times as many interleaved transfers as the other scenarios make runs.
        direct = [bench.curl_speed(["-w", "%{speed_download}", f"http://127.0.0.1:{bench.backend}/64m"])
                  for _ in range(RUNS * TRANSFERS_PER_RUN)]
        runs = per_proxy(lambda n: bench.transfer(n, ["-w", "%{speed_download}", f"http://127.0.0.1:{bench.ports[n]}/64m"]),
                         repeat=TRANSFERS_PER_RUN)
        sc["download_64m_MBps"] = {n: median_spread([r[0] for r in runs[n]]) for n in PROXIES}
        sc["download_64m_MBps"]["direct"] = median_spread(direct)
        sc["download_64m_cpu_ms"] = {n: median_spread([r[1] for r in runs[n]]) for n in PROXIES}
        # (a PUT that the backend stores whole before it answers: a backend answering at once would leave
        # each proxy to read and drop the rest of the body, and the figure would not be an upload's)
        runs = per_proxy(lambda n: bench.transfer(n, ["-w", "%{speed_upload}", "-T", str(bench.upload_file),
                                                      f"http://127.0.0.1:{bench.ports[n]}/upload"]),
                         repeat=TRANSFERS_PER_RUN)
        sc["upload_64m_MBps"] = {n: median_spread([r[0] for r in runs[n]]) for n in PROXIES}
        sc["upload_64m_cpu_ms"] = {n: median_spread([r[1] for r in runs[n]]) for n in PROXIES}

        # 5. idle keep-alive connections
        print("5. 10,000 idle keep-alive connections ...", flush=True)
        # HAProxy reserves two descriptors per connection and this machine caps a process at 20,000, so
        # it gets 9,900 connections; the figure compared is per connection.
        sc["idle_rss"] = {n: bench.idle_rss(n, 9900 if n == "haproxy" else 10000) for n in PROXIES}

        # 6. HTTPS keep-alive
        print("6. HTTPS keep-alive ...", flush=True)
        names = [n for n in PROXIES if n in bench.tls_ports]
        runs = per_proxy(lambda n: bench.wrk(f"https://127.0.0.1:{bench.tls_ports[n]}/1k", pid=bench.workers[n]), names)
        sc["https"] = {n: {"rps": median_spread([r["rps"] for r in runs[n]]) if n in runs else None} for n in PROXIES}

        # 7. HTTP/2
        print("7. HTTP/2 (h2load, TLS) ...", flush=True)
        for n in names:  # warm up: TLS sessions, backend pools
            bench.h2load(f"https://127.0.0.1:{bench.tls_ports[n]}/1k", seconds=1)
        runs = per_proxy(lambda n: bench.h2load(f"https://127.0.0.1:{bench.tls_ports[n]}/1k"), names)
        sc["http2"] = {n: {"rps": median_spread([r["rps"] for r in runs[n]]) if n in runs else None} for n in PROXIES}

        # 8. WAF: a plain browser-like GET (a Host name, User-Agent and Accept, so that no CRS rule matches
        # and neither proxy writes a log line per request), WAF on; and the same request, WAF off.
        print("8. WAF on (CRS 3.3.4, paranoia 1): Bastion vs nginx + ModSecurity ...", flush=True)
        bench.setup_waf()
        browser = bench.tmp / "browser.lua"
        browser.write_text('wrk.headers["Host"] = "localhost"\n'
                           'wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) bench"\n'
                           'wrk.headers["Accept"] = "text/html,*/*;q=0.8"\n')
        waf_names = {"bastion": "bastion-waf", "nginx": "nginx-waf"}
        waf_names = {k: v for k, v in waf_names.items() if v in bench.ports}
        for v in waf_names.values():
            bench.wrk(f"http://127.0.0.1:{bench.ports[v]}/1k", seconds=1, script=str(browser))
        runs = per_proxy(lambda n: bench.wrk(f"http://127.0.0.1:{bench.ports[waf_names[n]]}/1k", script=str(browser),
                                             pid=bench.workers[waf_names[n]]), list(waf_names))
        sc["waf"] = {n: ({k: median_spread([r[k] for r in runs[n]]) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")}
                         | {"errors": sum(r["errors"] for r in runs[n])}) if n in runs else None for n in PROXIES}
        runs = per_proxy(lambda n: bench.wrk(f"http://127.0.0.1:{bench.ports[n]}/1k", script=str(browser),
                                             pid=bench.workers[n]), ["bastion", "nginx"])
        sc["waf_off"] = {n: {k: median_spread([r[k] for r in runs[n]]) for k in ("rps", "cpu_us_per_req")}
                         if n in runs else None for n in PROXIES}
        sc["waf_notes"] = bench.notes
    finally:
        bench.cleanup()

    report(results)
    results["machine"] = machine()
    results["versions"] = versions()
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / time.strftime("%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(results, indent=2))
    print(f"\nResults written to {path.relative_to(ROOT)}")
    return 0


def report(results: dict) -> None:
    sc = results["scenarios"]
    rows = []

    def row(label, key, stats, digits=0, lower_is_better=False, compare=None):
        b, n, h = stats.get("bastion"), stats.get("nginx"), stats.get("haproxy")
        compare = compare or (lambda x, y: ratio(x, y, invert=lower_is_better))
        rows.append((label, fmt(b, digits), fmt(n, digits), fmt(h, digits), compare(b, n), compare(b, h)))

    p = sc["passthrough"]
    row("1 KiB pass-through req/s", "rps", {k: p[k]["rps"] for k in PROXIES})
    row("  p50 latency (ms)", "p50", {k: p[k]["p50_ms"] for k in PROXIES}, 2, True)
    row("  p99 latency (ms)", "p99", {k: p[k]["p99_ms"] for k in PROXIES}, 2, True)
    row("  proxy CPU per request (µs)", "cpu", {k: p[k]["cpu_us_per_req"] for k in PROXIES}, 1, True)
    u = sc["passthrough_unique"]
    row("same, every target different req/s", "", {k: u[k]["rps"] for k in PROXIES})
    row("  proxy CPU per request (µs)", "", {k: u[k]["cpu_us_per_req"] for k in PROXIES}, 1, True)
    f = sc.get("passthrough_fresh")
    if f:
        row("same, every head different req/s", "", {k: f[k]["rps"] for k in PROXIES})
        row("  proxy CPU per request (µs)", "", {k: f[k]["cpu_us_per_req"] for k in PROXIES}, 1, True)
    a = sc["added_latency"]
    # (added latency is a difference of two noisy figures, often near zero: compared as Bastion minus peer)
    row(f"added p50 at {a['rate']:.0f} req/s (ms)", "", {k: a[k]["p50_ms"] for k in PROXIES}, 3, compare=difference)
    row(f"added p99 at {a['rate']:.0f} req/s (ms)", "", {k: a[k]["p99_ms"] for k in PROXIES}, 3, compare=difference)
    row("cache hits req/s", "", {k: sc["cache_hits"][k]["rps"] for k in PROXIES})
    row("64 MiB download MB/s", "", sc["download_64m_MBps"])
    if "download_64m_cpu_ms" in sc:
        row("  proxy CPU per download (ms)", "", sc["download_64m_cpu_ms"], 1, True)
    row("64 MiB upload MB/s", "", sc["upload_64m_MBps"])
    if "upload_64m_cpu_ms" in sc:
        row("  proxy CPU per upload (ms)", "", sc["upload_64m_cpu_ms"], 1, True)
    idle = {k: ({"median": v["bytes_per_connection"], "min": v["bytes_per_connection"], "max": v["bytes_per_connection"]}
                if "bytes_per_connection" in v else None) for k, v in sc["idle_rss"].items()}
    row("idle keep-alive: RSS bytes/connection", "", idle, 0, True)
    row("HTTPS keep-alive req/s", "", {k: sc["https"][k]["rps"] for k in PROXIES})
    row("HTTP/2 (h2load) req/s", "", {k: sc["http2"][k]["rps"] for k in PROXIES})
    waf = sc.get("waf") or {}
    row("WAF on, req/s", "", {k: (waf.get(k) or {}).get("rps") for k in PROXIES})
    row("  WAF on: proxy CPU per request (µs)", "", {k: (waf.get(k) or {}).get("cpu_us_per_req") for k in PROXIES}, 0, True)
    off = sc.get("waf_off") or {}
    row("  same request, WAF off, req/s", "", {k: (off.get(k) or {}).get("rps") for k in PROXIES})
    header = ("scenario", "Bastion", "nginx", "HAProxy", "Bastion/nginx", "Bastion/HAProxy")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(6)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    print("\n" + line + "\n" + "-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    errors = {k: p[k]["errors"] for k in PROXIES}
    direct_download = sc["download_64m_MBps"].get("direct")
    print(f"\nwrk errors in pass-through runs: {errors}. Direct to backend: {fmt(p['direct']['rps'])} req/s"
          + (f"; 64 MiB download {fmt(direct_download)} MB/s." if direct_download else "."))
    if "floor" in p:
        floor = p["floor"]["cpu_us_per_req"]
        kinds = (("repeated heads", "passthrough"), ("every target different", "passthrough_unique"),
                 ("every head different", "passthrough_fresh"))
        above = "; ".join(
            f"{label} {sc[key]['bastion']['cpu_us_per_req']['median'] - sc[key]['floor']['cpu_us_per_req']['median']:.1f} µs"
            for label, key in kinds if key in sc)
        print(f"Python floor (bench/bare_forwarder.py: uvloop + httptools, no proxy work): {fmt(floor, 1)} µs of CPU "
              f"per request; nginx/floor {ratio(floor, p['nginx']['cpu_us_per_req'], invert=True)}. "
              f"Bastion's CPU per request above the floor: {above}.")
    print("Ratios: higher is better for Bastion (for latency, CPU and memory they are inverted, peer/Bastion); "
          "added latency: Bastion minus peer, lower is better.")
    print("Spread: (min–max) over the interleaved runs.")
    waf = sc.get("waf") or {}
    if any(waf.get(k) for k in PROXIES):
        print(f"WAF: Bastion runs CRS in its worker's inspection threads, pinned with it to one CPU; nginx + ModSecurity "
              f"in its one worker. wrk errors/non-2xx: { {k: v['errors'] for k, v in waf.items() if v} }.")
    for note in sc.get("waf_notes") or []:
        print("Note:", note)


def machine() -> dict:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(), "python": platform.python_version()}


def versions() -> dict:
    def first_line(args):
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    return {"bastion": first_line([str(BASTION), "version"]), "nginx": first_line(["nginx", "-v"]),
            "haproxy": first_line(["haproxy", "-v"]), "wrk": first_line(["wrk", "-v"]),
            "h2load": first_line(["h2load", "--version"])}


if __name__ == "__main__":
    sys.exit(main())
