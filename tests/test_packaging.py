"""The wheel works on its own: built from a copy of the checkout, installed into a fresh venv, used elsewhere.

Nothing is downloaded: the wheel is built without build isolation (the test venv's setuptools) and installed
with ``--no-deps --no-index``; the new venv sees the test venv's third-party packages through a ``.pth``
file that names the test venv's site-packages. A path in a ``.pth`` file is added to ``sys.path`` but the
``.pth`` files inside it are not processed, so the test venv's editable install of vectorgeo stays out:
``import vectorgeo`` must come from the wheel. Every command runs from a folder outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

# checkout folders that are not part of the source (outputs, caches, other environments)
NOT_SOURCE = {
    ".git",
    ".venv",
    ".snakemake",
    ".vectorgeo",
    ".make",
    "node_modules",
    "results",
    "logs",
    "test-artifacts",
    "build",
    "dist",
    ".tmp",
}


@dataclass
class Installed:
    """A fresh venv holding only the wheel (plus a view of the test venv's third-party packages)."""

    venv: Path
    site_packages: Path
    work: Path  # a folder outside the checkout, the working directory of every command
    env: dict[str, str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=self.work, env=self.env, capture_output=True, text=True, timeout=300)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.venv / "bin" / "python"), "-c", code)


def _ignore(folder: str, names: list[str]) -> set[str]:
    top = Path(folder).resolve() == ROOT
    return {n for n in names if (top and n in NOT_SOURCE) or n == "__pycache__" or n.endswith((".egg-info", "_cache"))}


def _check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        pytest.fail(f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("packaging")
    # a copy of the checkout: building in place would leave build/ and *.egg-info in it
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_ignore, symlinks=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VECTORGEO_", "VIRTUAL_ENV"))}
    wheels = tmp / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, source],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    _check(build, "pip wheel")
    (wheel,) = wheels.glob("vectorgeo-*.whl")
    venv = tmp / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", venv], env=env, capture_output=True, text=True), "venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)]
    _check(subprocess.run(pip, env=env, capture_output=True, text=True, timeout=300), "pip install")
    purelib = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    site_packages = Path(purelib)
    (site_packages / "test_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "elsewhere"
    work.mkdir()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VECTORGEO_HOME"] = str(tmp / "home")
    return Installed(venv, site_packages, work, env)


def test_vectorgeo_is_imported_from_the_wheel(installed: Installed) -> None:
    proc = installed.python("import vectorgeo, numpy; print(vectorgeo.__file__); print(numpy.__file__)")
    _check(proc, "import vectorgeo")
    package, numpy = proc.stdout.split()
    assert Path(package).is_relative_to(installed.site_packages), package
    assert not Path(package).is_relative_to(ROOT)
    assert Path(numpy).is_relative_to(sysconfig.get_paths()["purelib"])  # third-party: the test venv's


def test_package_ships_its_data_files(installed: Installed) -> None:
    proc = installed.python("import vectorgeo, pathlib; print(pathlib.Path(vectorgeo.__file__).parent)")
    _check(proc, "import vectorgeo")
    package = Path(proc.stdout.strip())
    assert (package / "py.typed").is_file(), sorted(p.name for p in package.iterdir())
    for asset in ("index.html", "app.js", "style.css"):
        assert (package / "static" / asset).is_file(), asset


def test_console_script_help(installed: Installed) -> None:
    script = installed.venv / "bin" / "vectorgeo"
    assert script.is_file()
    proc = installed.run(str(script), "--help")
    _check(proc, "vectorgeo --help")
    assert "usage: vectorgeo" in proc.stdout and "query" in proc.stdout


def test_db_status_outside_the_checkout(installed: Installed) -> None:
    """No cluster in VECTORGEO_HOME: 'not initialised' (exit 3), never a traceback."""
    proc = installed.run(str(installed.venv / "bin" / "vectorgeo"), "db", "status")
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "FileNotFoundError" not in out, out
    assert proc.returncode == 3 and "not initialised" in proc.stdout, out


def test_load_config_on_a_copy_of_the_default_config(installed: Installed) -> None:
    config = installed.work / "config.yaml"
    shutil.copy(ROOT / "config" / "config.yaml", config)
    code = (
        "from vectorgeo.config import load_config; "
        f"cfg = load_config({str(config)!r}); "
        "print(sorted(cfg['layers']), cfg['stencil']['resolution'])"
    )
    proc = installed.python(code)
    _check(proc, "load_config")
    assert proc.stdout.split("]")[0] + "]" == "['elevation', 'imagery', 'landcover']", proc.stdout
