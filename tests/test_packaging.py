"""pyproject.toml against requirements.lock, and optional features without their extra.

A missing extra is simulated by `sys.modules[name] = None` (Python then fails the import with
ModuleNotFoundError, as for an absent package); .ci/core_only.sh checks a real core-only install.
"""

import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from sentiment_jax import _extras, data, tokenization
from test_train import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(r) for r in PROJECT["dependencies"]] + [
    Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra]


def locked() -> dict[str, str]:
    """{canonical name: version} of every `name==version` line of the lock."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith((" ", "#")):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"not an exact pin in requirements.lock: {line}"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_dependency_is_locked_at_a_version_inside_its_range():
    pins = locked()
    for req in REQUIREMENTS:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements.lock; run make lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"locked {name}=={pins[name]} is outside {req}"
    assert pins["torch"] == "2.13.0"  # no local label: the same line picks the CPU build where it is at hand


def test_every_locked_package_is_still_needed():
    """The other way round: each pin traces back, through pip-compile's `# via` notes, to pyproject.toml,
    so a dependency dropped there cannot stay locked and installed."""
    via, name = {}, None
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith((" ", "#")):
            name = canonicalize_name(line.partition("==")[0])
            via[name] = set()
        elif name and line.strip().startswith("#") and line.strip() != "# via":
            parent = line.strip().removeprefix("#").strip().removeprefix("via").strip()
            via[name].add(parent if "(" in parent else canonicalize_name(parent))
    direct = {canonicalize_name(r.name) for r in REQUIREMENTS}
    for name, parents in via.items():
        if "sentiment_jax (pyproject.toml)" in parents:
            assert name in direct, f"{name} is locked for pyproject.toml, which no longer asks for it; run make lock"
    needed = {n for n, parents in via.items() if "sentiment_jax (pyproject.toml)" in parents}
    while grown := {n for n, parents in via.items() if n not in needed and parents & needed}:
        needed |= grown
    assert set(via) == needed, f"locked but needed by nothing: {sorted(set(via) - needed)}; run make lock"


def test_core_ranges_keep_an_installed_jax_of_either_series():
    jax = next(r for r in REQUIREMENTS if r.name == "jax")
    for installed in ("0.10.0", "0.10.2", "0.11.0", "0.11.3"):
        assert jax.specifier.contains(Version(installed)), installed
    assert not any(r.name in ("jaxlib", "transformers", "importlib_resources") for r in map(Requirement, PROJECT["dependencies"]))


def test_require_names_the_extra(monkeypatch):
    assert _extras.require("json", "serve").dumps([1]) == "[1]"
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(_extras.MissingExtra, match=r"^tokenizers is not installed; .* pip install 'sentiment_jax\[hf\]'$"):
        tokenization.HFTokenizer.from_folder("any")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'sentiment_jax\[tfds\]'"):
        data.load_tfds(None)


def run_without(module: str, program: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    """`python -m program args` with `module` unimportable."""
    code = (f"import runpy, sys; sys.modules[{module!r}] = None; sys.argv = [{program!r}, *{list(args)!r}]; "
            f"runpy.run_module({program!r}, run_name='__main__', alter_sys=True)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("module, extra, program, args", [
    ("fastapi", "serve", "sentiment_jax.serve", ["--model=lstm=runs/none"]),
    ("wandb", "wandb", "sentiment_jax.main", ["--config=configs/lstm.py", "--config.train.wandb_project=demo",
                                              "--workdir={tmp}/run"]),
    ("datasets", "hf", "sentiment_jax.main", ["--config=configs/lstm.py", "--config.data.name=huggingface",
                                              "--config.data.hf_name=imdb", "--workdir={tmp}/run"]),
])
def test_a_program_without_its_extra_says_so_in_one_line(tmp_path, module, extra, program, args):
    proc = run_without(module, program, *(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"error: {module} is not installed; it comes with the '{extra}' extra: "
                                        f"pip install 'sentiment_jax[{extra}]'"]
