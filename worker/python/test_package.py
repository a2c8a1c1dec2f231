"""`pip install ./worker/python` builds and installs the typed package `baton_worker` offline.

The test copies the package sources to a temporary directory (an in-tree setuptools build writes
build/ and *.egg-info beside the sources), makes a venv there, installs with
`pip install --no-build-isolation --no-index` (no network: setuptools comes from the Python that
makes the venv, through --system-site-packages) and imports the result from the venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent

# What a Python needs to build this package offline: venv and ensurepip to make the venv, and a
# setuptools that can write a wheel (70.1 and later do it alone, older ones need `wheel`).
CAN_BUILD = """
import ensurepip, venv, setuptools.build_meta, setuptools
v = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
if v < (70, 1):
    import wheel
"""


def builder_python() -> Optional[str]:
    """The first Python that can build the package offline: the one running the tests, or the
    distribution's (Debian: python3-venv, python3-setuptools and python3-wheel)."""
    tried: List[str] = []
    for exe in (sys.executable, "/usr/bin/python3"):
        if exe in tried or not os.path.exists(exe):
            continue
        tried.append(exe)
        if subprocess.run([exe, "-c", CAN_BUILD], capture_output=True).returncode == 0:
            return exe
    return None


def run(args: List[str], **kw) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
    if p.returncode != 0:
        raise AssertionError("%s: exit %d\n%s%s" % (" ".join(args), p.returncode, p.stdout, p.stderr))
    return p.stdout


class PackageTest(unittest.TestCase):
    def test_pip_install_offline_and_import(self):
        exe = builder_python()
        self.assertIsNotNone(
            exe,
            "no Python here can build the package offline: it needs venv, ensurepip and setuptools "
            "(older than 70.1: and wheel); on Debian: apt-get install python3-venv python3-setuptools python3-wheel",
        )
        tmp = Path(tempfile.mkdtemp(prefix="baton-pkg-"))
        self.addCleanup(shutil.rmtree, tmp, True)
        src = tmp / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "baton_worker.py"):
            shutil.copy2(HERE / name, src / name)
        shutil.copytree(HERE / "pkg", src / "pkg", symlinks=True)
        self.assertTrue((src / "pkg" / "baton_worker" / "__init__.py").is_symlink())

        venv = tmp / "venv"
        run([exe, "-m", "venv", "--system-site-packages", str(venv)])
        py = str(venv / "bin" / "python")
        run([py, "-m", "pip", "install", "--no-build-isolation", "--no-index", "--no-cache-dir", str(src)])

        # -I: no PYTHONPATH, no script directory; run from an empty directory, so the only
        # baton_worker to find is the installed one.
        empty = tmp / "empty"
        empty.mkdir()
        out = run(
            [
                py, "-I", "-c",
                "import baton_worker, importlib.resources as r, sys\n"
                "print(baton_worker.__file__)\n"
                "print(r.files('baton_worker').joinpath('py.typed').is_file())\n"
                "print(baton_worker.MsgType(baton_worker.split(baton_worker.encode_drain(1500))[0]).name)\n",
            ],
            cwd=str(empty),
        ).split("\n")
        installed = Path(out[0])
        self.assertTrue(str(installed).startswith(str(venv)), installed)
        self.assertEqual(installed.name, "__init__.py")
        self.assertEqual(out[1], "True", "py.typed is not installed")
        self.assertEqual(out[2], "DRAIN")
        # One source: the installed package is the one-file module, byte for byte.
        self.assertEqual(installed.read_bytes(), (HERE / "baton_worker.py").read_bytes())
        # And pip knows it (so `pip uninstall baton-worker` works).
        self.assertIn("baton-worker", run([py, "-m", "pip", "list", "--no-index"]).lower())


if __name__ == "__main__":
    unittest.main()
