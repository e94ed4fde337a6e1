"""Compiles Bastion's hot path (the HTTP/1.1 proxy loop) into C extension modules with mypyc.

`make compiled` (and so `make run`, `make test`, `make bench`) runs it: python tools/compile.py build_ext --inplace.
The modules stay plain Python: compiling them makes their classes C structs and their calls between each other
C calls; their annotations become checks at run time. Without the build, or with BASTION_PURE=1, Bastion runs
the same modules interpreted (see bastion/__init__.py and docs/performance.md, "The compiled hot path")."""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

from bastion import COMPILED_MODULES  # noqa: E402
from mypyc.build import mypycify  # noqa: E402

files = [name.replace(".", "/") + ".py" for name in COMPILED_MODULES]
setup(
    name="bastion-compiled",
    script_args=sys.argv[1:] or ["build_ext", "--inplace"],
    # One group: the modules call each other natively; its shared library lives inside the package.
    ext_modules=mypycify(["--config-file", "tools/compile.ini", *files], separate=[(files, "bastion._compiled")],
                         opt_level="3"),
)

# An unchanged source can leave an older extension in place; bastion/__init__.py compares times, so every part of
# the build is marked as new.
for name in ("bastion._compiled__mypyc", *COMPILED_MODULES):
    for built in glob.glob(name.replace(".", "/") + ".cpython-*"):
        os.utime(built)
