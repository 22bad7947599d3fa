"""The offline wheelhouse for CUDA hosts (`make gpu-wheels`) and its installer (bench/gpu_deps.sh).

The build tests download from PyPI (slow). The install runs offline: pip with --no-index and,
where this machine allows it, inside a network namespace with no network at all, into a bare
Python (a venv without pip or any package) standing in for a CUDA host without the web stack.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.slow  # real processes: bash, pip and fresh interpreters

ROOT = Path(__file__).resolve().parents[2]
DEPS = ROOT / "bench" / "gpu_deps.sh"
MAX_MIB = 64
# What a CUDA host brings itself; the wheelhouse must not carry them.
HOST_PROVIDED = {"torch", "numpy"}
IMPORTS = "fastapi, starlette, pydantic, pydantic_settings, uvicorn, httptools, uvloop, multipart, " \
          "prometheus_client, safetensors, PIL"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _serving_packages() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["serve"]
    names = {_canonical(re.match(r"[A-Za-z0-9._-]+", d).group()) for d in deps}
    return names - HOST_PROVIDED


def _wheels(folder: Path) -> dict[str, Path]:
    return {_canonical(w.name.split("-")[0]): w for w in folder.glob("*.whl")}


def _can_unshare_network() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def _bare_python(folder: Path) -> Path:
    """A Python with nothing installed, not even pip: stands in for a host without the web
    stack (torch is not needed to import the serving packages)."""
    venv.create(folder, with_pip=False)
    py = folder / "bin" / "python"
    assert subprocess.run([py, "-c", "import fastapi"], capture_output=True).returncode != 0
    return py


def _run_deps(py: Path, env: dict[str, str], offline: bool = False):
    cmd = ["bash", str(DEPS), str(py)]
    if offline and _can_unshare_network():
        cmd = ["unshare", "-n", *cmd]
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(cmd, env=base | env, capture_output=True, text=True, timeout=300)


def test_make_gpu_wheels_builds_a_cpython_312_wheelhouse_under_64_mib(tmp_path):
    dest = tmp_path / "gpu"
    proc = subprocess.run(["make", "-s", "gpu-wheels", f"GPU_WHEELS={dest}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = _wheels(dest)
    missing = _serving_packages() - set(wheels)
    assert not missing, f"no wheel for {missing}"
    assert not HOST_PROVIDED & set(wheels), "torch and numpy come with the host"
    assert "pip" in wheels, "a Python without pip runs pip from its wheel"
    for wheel in wheels.values():
        pys, abi, plat = wheel.name[:-4].split("-")[-3:]
        assert abi in ("cp312", "abi3", "none"), wheel.name
        assert abi != "none" or "py3" in pys.split("."), wheel.name
        assert plat == "any" or ("manylinux" in plat and plat.endswith("x86_64")), wheel.name
    total = sum(w.stat().st_size for w in wheels.values())
    assert total <= MAX_MIB * 2**20, f"{total / 2**20:.1f} MiB"
    # requirements.txt pins exactly the wheels that are there (pip, the tool, aside).
    lines = (dest / "requirements.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    assert set(pins) == set(wheels) - {"pip"}
    for name, version in pins.items():
        assert wheels[name].name.split("-")[1] == version


def test_gpu_deps_installs_the_wheelhouse_offline_into_a_private_folder(tmp_path):
    # A wheelhouse built the same way for this machine's Python, so the bare Python can use it.
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_wheels.py"), "--dest", str(wheels),
         "--python-version", here],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    py = _bare_python(tmp_path / "host")
    target = tmp_path / "site"

    proc = _run_deps(py, {"GPU_WHEELS": str(wheels), "GPU_DEPS_TARGET": str(target)},
                     offline=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "offline" in proc.stderr and proc.stdout.strip() == f"PYTHONPATH={target}"
    check = subprocess.run(
        [py, "-c", f"import {IMPORTS}; print(fastapi.__file__)"],
        env={"PYTHONPATH": str(target)}, capture_output=True, text=True,
    )
    assert check.returncode == 0, check.stderr
    assert Path(check.stdout.strip()).is_relative_to(target)
    assert not list(target.glob("pip")), "pip is the tool, not a serving package"

    # A second call finds the folder and installs nothing.
    again = _run_deps(py, {"GPU_WHEELS": str(wheels), "GPU_DEPS_TARGET": str(target)})
    assert again.returncode == 0 and "installing" not in again.stderr, again.stderr


def test_gpu_deps_without_a_wheelhouse_says_how_to_build_one(tmp_path):
    py = _bare_python(tmp_path / "host")
    proc = _run_deps(py, {"GPU_WHEELS": str(tmp_path / "none"),
                          "GPU_DEPS_TARGET": str(tmp_path / "site")})
    assert proc.returncode != 0
    assert "make gpu-wheels" in proc.stderr
    assert not (tmp_path / "site").exists()


def test_gpu_deps_leaves_a_complete_python_alone(tmp_path):
    proc = _run_deps(Path(sys.executable), {"GPU_WHEELS": str(tmp_path / "none"),
                                            "GPU_DEPS_TARGET": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "PYTHONPATH="
    assert not (tmp_path / "site").exists()


def test_gpu_deps_installs_when_the_wheelhouse_names_a_missing_distribution(tmp_path):
    # The imports work, but the wheelhouse asks for a distribution this Python lacks: it goes to
    # the wheelhouse (which here has no wheel for it, so pip fails, offline and at once).
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "requirements.txt").write_text("# test\ntaming-absent-dist==1.0\n")
    proc = _run_deps(Path(sys.executable), {"GPU_WHEELS": str(wheels),
                                            "GPU_DEPS_TARGET": str(tmp_path / "site")})
    assert proc.returncode != 0
    assert "installing the serving packages" in proc.stderr
    assert "taming-absent-dist" in proc.stderr
