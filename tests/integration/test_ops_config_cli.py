"""`bastion check` / `bastion run` on bad configurations: file, field path and problem, exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BASTION = str(Path(sys.executable).parent / "bastion")
GOOD = 'listeners: ["127.0.0.1:1"]\nroutes:\n  - name: app\n    upstream: {servers: ["127.0.0.1:9"]}\n'


def run(*args, env=None, timeout=20):
    return subprocess.run([BASTION, *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


BAD = [
    ("unknown-field", GOOD + "wrokers: 2\n", "wrokers", "unknown field"),
    ("bad-server-address", 'listeners: ["127.0.0.1:1"]\nroutes:\n  - upstream: {servers: ["nohost"]}\n',
     "routes[0].upstream.servers[0].address", "not an address"),
    ("two-actions", 'listeners: ["127.0.0.1:1"]\nroutes:\n  - upstream: {servers: ["127.0.0.1:9"]}\n    respond: {body: x}\n',
     "routes[0]", "exactly one of upstream, redirect, respond"),
    ("undefined-upstream", 'listeners: ["127.0.0.1:1"]\nroutes:\n  - upstream: nope\n', "routes[0].upstream", "no upstream named 'nope'"),
    ("bad-regex", 'listeners: ["127.0.0.1:1"]\nroutes:\n  - match: {path: {regex: "(["}}\n    respond: {body: x}\n',
     "routes[0].match.path", "does not compile"),
    ("bad-duration", GOOD + "timeouts: {connect: soon}\n", "timeouts.connect", "not a duration"),
    ("bad-workers", GOOD + "workers: many\n", "workers", "auto"),
    ("no-routes", 'listeners: ["127.0.0.1:1"]\n', "routes", "required"),
    ("invalid-yaml", GOOD + "routes: [\n", "line", "invalid YAML"),
    ("missing-env", 'listeners: ["${BASTION_TEST_NOPE}"]\nroutes:\n  - respond: {body: x}\n', "listeners[0]",
     "BASTION_TEST_NOPE is not set"),
    ("missing-include", GOOD + "include: [nothere.yaml]\n", "include[0]", "no such file"),
    ("bad-filter", 'listeners: ["127.0.0.1:1"]\nroutes:\n  - respond: {body: x}\n    filters: [{use: "no.such.module:X"}]\n',
     "routes[0].filters[0].use", "cannot import"),
    ("bad-redirect-placeholder", 'listeners: ["127.0.0.1:1"]\nroutes:\n  - redirect: {to: "https://{hots}/"}\n',
     "routes[0].redirect.to", "unknown placeholder"),
]


@pytest.mark.parametrize("text, path, message", [pytest.param(t, p, m, id=i) for i, t, p, m in BAD])
def test_check_reports_file_path_and_problem(tmp_path, text, path, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    result = run("check", str(f))
    assert result.returncode == 2
    assert "config error:" in result.stderr and str(f) in result.stderr
    assert path in result.stderr and message in result.stderr, result.stderr


def test_error_inside_an_included_file_names_that_file(tmp_path):
    (tmp_path / "routes.yaml").write_text('routes:\n  - upstream: {servers: ["127.0.0.1:9", "bad address"]}\n')
    main = tmp_path / "main.yaml"
    main.write_text('listeners: ["127.0.0.1:1"]\ninclude: [routes.yaml]\n')
    result = run("check", str(main))
    assert result.returncode == 2
    assert str(tmp_path / "routes.yaml") in result.stderr and "routes[0].upstream.servers[1].address" in result.stderr


def test_run_with_bad_config_exits_2_before_starting(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(GOOD + "wrokers: 2\n")
    result = run("run", "-c", str(f))
    assert result.returncode == 2 and "wrokers" in result.stderr and str(f) in result.stderr


def test_check_good_config_prints_routes_with_env_and_includes(tmp_path):
    (tmp_path / "more.yaml").write_text('routes:\n  - name: extra\n    match: {path: /x}\n    respond: {body: x}\n')
    main = tmp_path / "main.yaml"
    main.write_text('include: more.yaml\nworkers: ${W:-3}\nlisteners: ["${L:-127.0.0.1:7000}"]\n'
                    'routes:\n  - name: app\n    upstream: {servers: ["${UP}"]}\n')
    result = run("check", str(main), env={"UP": "127.0.0.1:9123", "L": ""})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "workers: 3" in out and "127.0.0.1:7000" in out and "127.0.0.1:9123" in out
    assert out.index("app:") < out.index("extra:")


def test_version():
    result = run("version")
    assert result.returncode == 0 and result.stdout.startswith("bastion 0.")
