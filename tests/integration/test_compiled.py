"""The hot path compiled by `make compiled` (mypyc), and the same sources interpreted (BASTION_PURE=1, or no
build): the running Bastion says which one it is, and both answer the same."""

import glob
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import bastion as package

BASTION = str(Path(sys.executable).parent / "bastion")
BUILT = glob.glob(str(Path(package.__file__).parent / "_compiled__mypyc.*"))


def version(env: dict) -> str:
    return subprocess.run([BASTION, "version"], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, **env)).stdout


@pytest.mark.skipif(not BUILT, reason="`make compiled` builds the hot path (`make test` does)")
@pytest.mark.skipif(bool(os.environ.get("BASTION_PURE")), reason="the suite runs interpreted (BASTION_PURE is set)")
def test_the_compiled_hot_path_runs_and_the_sources_can_take_its_place(bastion, backend):
    assert "(hot path compiled)" in version({})
    assert "(hot path interpreted)" in version({"BASTION_PURE": "1"})
    for env, kind in (({}, "compiled"), ({"BASTION_PURE": "1"}, "interpreted")):
        b = bastion({"routes": [{"upstream": {"servers": [backend.address]}}]}, env=env)
        for i in range(4):  # from the second time on, both heads are known ones (bastion/http/known_heads.py)
            with urllib.request.urlopen(f"{b.url}/echo/x") as r:
                assert r.status == 200 and json.loads(r.read())["path"] == "/echo/x"
        assert f"(hot path {kind})" in b.stderr()
        b.stop()
