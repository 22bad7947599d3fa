"""Build the offline wheelhouse for a CUDA host: every serving dependency but torch and numpy.

A GPU host (or an air-gapped server) typically has PyTorch with CUDA and the scientific stack
but not the web stack, and no network. This downloads, for that host's Python and manylinux
x86-64, binary wheels of the project's runtime requirements (pyproject.toml, less torch and
numpy) and of everything they pull in, at the versions installed here (the tested set), plus
pip itself so that a Python without pip can still install them. It writes requirements.txt
beside the wheels and fails when a requirement has no wheel or the folder outgrows its limit.

    python bench/gpu_wheels.py [--dest wheels/gpu] [--python-version 3.12] [--max-mib 64]

Install on the host, offline: bench/gpu_deps.sh, or
    pip install --no-index --find-links wheels/gpu -r wheels/gpu/requirements.txt
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# The host brings these (a CUDA build of torch, numpy with it); never shipped here.
HOST_PROVIDED = {"torch", "numpy"}
# pip's manylinux tags for x86-64, newest first: pip picks the best wheel each release has.
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def serving_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's runtime requirements the host may lack, plus pip."""
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["serve"]
    return [d for d in deps if requirement_name(d) not in HOST_PROVIDED] + ["pip"]


def installed_pins() -> list[str]:
    """name==version of every distribution this interpreter has (local builds such as
    torch+cpu left out): the wheelhouse gets the versions the tests ran with."""
    pins = {}
    for dist in md.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and "+" not in version:
            pins[canonical(name)] = f"{canonical(name)}=={version}"
    return sorted(pins.values())


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-")[0])


def download(reqs: list[str], dest: Path, python_version: str, pin: bool) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # a rebuild holds exactly what this run resolves
        old.unlink()
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("\n".join(installed_pins() if pin else []) + "\n")
        constraints.flush()
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(dest),
               "--only-binary=:all:", "--implementation", "cp",
               "--python-version", python_version, "--constraint", constraints.name]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run(cmd + reqs, check=True)


def check(dest: Path, reqs: list[str], python_version: str, max_mib: float) -> list[str]:
    """Problems with the wheelhouse: a requirement without a wheel, a wheel for another
    Python, or too many bytes in all."""
    wheels = sorted(dest.glob("*.whl"))
    have = {wheel_name(w) for w in wheels}
    problems = [f"no wheel for {r}" for r in reqs if requirement_name(r) not in have]
    cp = "cp" + python_version.replace(".", "")
    for w in wheels:
        pys, abi, plat = w.name[:-4].split("-")[-3:]
        for_python = abi in (cp, "abi3") or (abi == "none" and ("py3" in pys.split(".") or cp == pys))
        for_platform = plat == "any" or ("manylinux" in plat and plat.endswith("x86_64"))
        if not (for_python and for_platform):
            problems.append(f"{w.name} is not for CPython {python_version} on manylinux x86-64")
    total = sum(w.stat().st_size for w in wheels) / 2**20
    if total > max_mib:
        problems.append(f"{total:.1f} MiB in all, over the {max_mib:g} MiB limit")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dest", type=Path, default=ROOT / "wheels" / "gpu")
    p.add_argument("--python-version", default="3.12", help="the host's CPython, e.g. 3.12")
    p.add_argument("--max-mib", type=float, default=64.0)
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="newest releases instead of the versions installed here")
    args = p.parse_args(argv)

    reqs = serving_requirements()
    download(reqs, args.dest, args.python_version, args.pin)
    wheels = sorted(args.dest.glob("*.whl"))
    # Exact versions of what was resolved: the host installs exactly this set (pip, the tool,
    # stays out of it).
    pinned = [f"{wheel_name(w)}=={w.name.split('-')[1]}" for w in wheels if wheel_name(w) != "pip"]
    (args.dest / "requirements.txt").write_text(
        f"# serving dependencies for CPython {args.python_version}, manylinux x86-64 "
        "(torch and numpy come with the host)\n" + "\n".join(pinned) + "\n")
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{total:7.2f} MiB  {len(wheels)} wheels in {args.dest}")
    problems = check(args.dest, reqs, args.python_version, args.max_mib)
    for problem in problems:
        print("error:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
