"""The `bastion` command: run | check | reload | version."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from bastion import __version__


def _config_path(args) -> str | None:
    return args.config or args.file


def _cmd_run(args) -> int:
    path = _config_path(args)
    if not path:
        print("bastion run: give a configuration file: bastion run -c FILE", file=sys.stderr)
        return 2
    from bastion.server.master import Master

    return Master(path).start()


def _cmd_check(args) -> int:
    path = _config_path(args)
    if not path:
        print("bastion check: give a configuration file: bastion check FILE", file=sys.stderr)
        return 2
    from bastion.config.compile import load_runtime
    from bastion.config.loader import ConfigError
    from bastion.server.master import print_config_error, worker_count
    from bastion.upstream.discovery import describe

    try:
        runtime = load_runtime(path)
    except ConfigError as exc:
        print_config_error(exc)
        return 2
    config = runtime.config
    print(f"{path}: configuration is valid")
    print(f"listeners: {', '.join(listener.address for listener in config.listeners)}")
    if config.admin is not None:
        print(f"admin: {config.admin.address}")
    print(f"workers: {worker_count(config)}")
    print("routes (in match order):")
    for route in runtime.router.routes:
        if route.upstream is not None:
            group = route.upstream
            targets = [f"{p.address} (weight {p.weight}{', backup' if p.backup else ''})" for p in group.peers]
            targets += [describe(s) for s in group.sources]
            action = f"-> [{group.balance}] " + ", ".join(targets)
        else:
            spec = config.routes[route.index]
            action = f"redirect {spec.redirect.status} {spec.redirect.to}" if spec.redirect else f"respond {spec.respond.status}"
        print(f"  {route.name}: {route.description} {action}")
    return 0


def _cmd_reload(args) -> int:
    pid_file = args.pid_file
    if pid_file is None:
        path = _config_path(args)
        if not path:
            print("bastion reload: give -c CONFIG (to find its pid_file) or --pid-file FILE", file=sys.stderr)
            return 2
        from bastion.config.loader import ConfigError, load_config
        from bastion.server.master import print_config_error

        try:
            config = load_config(path)
        except ConfigError as exc:
            print_config_error(exc)
            return 2
        pid_file = config.pid_file
        if not pid_file:
            print(f"bastion reload: {path} sets no pid_file; use --pid-file or send SIGHUP to the master", file=sys.stderr)
            return 2
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as exc:
        print(f"bastion reload: cannot read master pid from {pid_file}: {exc}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"bastion reload: no process {pid} (from {pid_file}); is bastion running?", file=sys.stderr)
        return 1
    print(f"reload signalled to master {pid}")
    return 0


def _cmd_version(args) -> int:
    from bastion.server.master import _version

    print(f"bastion {_version()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bastion", description="Bastion reverse proxy and API gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("run", "start the master and workers"), ("check", "validate a configuration"),
                           ("reload", "ask a running master to reload its configuration")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("file", nargs="?", help="configuration file")
        p.add_argument("-c", "--config", help="configuration file")
        if name == "reload":
            p.add_argument("--pid-file", help="the master's pid file")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    handler = {"run": _cmd_run, "check": _cmd_check, "reload": _cmd_reload, "version": _cmd_version}[args.command]
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
