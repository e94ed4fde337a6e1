"""Bastion: a reverse proxy and API gateway written in Python."""

import os
import sys

__version__ = "0.1.0"

# The hot path, compiled with mypyc by `make compiled` (tools/compile.py) into extension modules beside these
# sources. They are one unit: compiled modules call each other directly, so either all of them load compiled or
# none does. The interpreted sources are used when BASTION_PURE=1, when there is no build, or when a source is
# newer than the build (an edit since the last `make`), never a stale build.
COMPILED_MODULES = (
    "bastion.http.h1_server",
    "bastion.http.h1_upstream",
    "bastion.http.known_heads",
    "bastion.proxy.exchange",
    "bastion.proxy.engine",
    "bastion.proxy.runtime",
    "bastion.upstream.pool",
    "bastion.upstream.balancer",
    "bastion.observability.metrics",
)


def _source(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), *name.split(".")[1:]) + ".py"


def _compiled_build_usable() -> bool:
    import glob

    built = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_compiled__mypyc.*"))
    if not built or os.environ.get("BASTION_PURE"):
        return False
    oldest_build = os.path.getmtime(built[0])
    for name in COMPILED_MODULES:
        source = _source(name)
        if not glob.glob(source[:-3] + ".cpython-*") or os.path.getmtime(source) > oldest_build:
            sys.stderr.write("bastion: the compiled hot path is older than its sources; running them interpreted"
                             " (`make compiled` rebuilds it)\n")
            return False
    return True


class _InterpretedHotPath:
    """Finds the hot modules' .py sources ahead of their compiled extensions."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in COMPILED_MODULES:
            return None
        from importlib.util import spec_from_file_location

        return spec_from_file_location(name, _source(name))


COMPILED = _compiled_build_usable()
if not COMPILED:
    sys.meta_path.insert(0, _InterpretedHotPath)
