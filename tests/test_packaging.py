"""The installed API is one namespace, `longctx`, that coexists with unrelated packages named like
our rooms (Hugging Face's `kernels`); docs/layout.md names every module; the code is lint-clean."""
import os
import re
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.shared import shared_once

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("kernels", "data", "pipeline", "launch")


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # built once, by the first worker to need it: setuptools builds in the checkout (build/, the egg-info), and two
    # workers' builds there at once would share those folders
    with shared_once(tmp_path_factory, "wheel") as (out, first):
        if first:
            _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out,
                  ROOT])
    return next(out.glob("longctx-*.whl"))


def test_wheel_installs_only_the_longctx_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"longctx", next(t for t in tops if t.endswith(".dist-info"))}, tops
    # every module of every room made it in, under the namespace, and the script templates too
    for room in ROOMS:
        for f in (ROOT / room).rglob("*.py"):
            assert f"longctx/{f.relative_to(ROOT).as_posix()}" in names, f
    for tpl in ("launch/slurm/train.sbatch", "launch/deepspeed/train.sh", "launch/ray/prepare.sh"):
        assert f"longctx/{tpl}" in names


def _venv_seeing_this_environment(env_dir):
    """A fresh virtualenv that imports torch & co. (and setuptools, to build `other`) from the environment running
    the tests, after its own site-packages. Not `system_site_packages=True`: from inside a virtualenv that is the
    base interpreter's site-packages (no torch, an older setuptools: "invalid command 'bdist_wheel'"). A .pth file
    adds each of this environment's site directories as `site` does, with their own .pth files (a venv of a venv
    with --system-site-packages, the editable install's finder, which the wheel's copy shadows)."""
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    own = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    dirs = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    Path(own, "running-environment.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    return py


def test_wheel_beside_a_package_named_kernels(wheel, tmp_path):
    """A fresh virtualenv with the wheel and another distribution's top-level `kernels`: both import."""
    other = tmp_path / "other"
    (other / "kernels").mkdir(parents=True)
    (other / "kernels" / "__init__.py").write_text("WHO = 'someone else'\n")
    (other / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = '
                                          '"setuptools.build_meta"\n[project]\nname = "kernels"\nversion = "1.0"\n'
                                          '[tool.setuptools]\npackages = ["kernels"]\n')
    env_dir = tmp_path / "venv"
    py = _venv_seeing_this_environment(env_dir)
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-build-isolation", "--no-index",
          wheel, other])
    probe = ("import kernels, longctx, longctx.kernels, longctx.pipeline.training.trainer, longctx.launch.cli\n"
             "assert kernels.WHO == 'someone else', kernels.__file__\n"
             "assert longctx.__file__.startswith(sys.prefix), longctx.__file__\n"
             "assert longctx.kernels.__file__.startswith(sys.prefix), longctx.kernels.__file__\n"
             "import longctx.kernels as k; print(k.ssd.__name__)\n")
    r = _run([py, "-c", "import sys\n" + probe], cwd=tmp_path)
    assert r.stdout.strip() == "ssd"
    r = _run([env_dir / "bin" / "longctx", "--help"], cwd=tmp_path)
    assert "prepare" in r.stdout


def test_source_checkout_imports_without_installing(tmp_path):
    """PYTHONPATH=<checkout> with no installed copy (a GPU node with no package index)."""
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import longctx.kernels, longctx.pipeline.model\n"
            "print(longctx.kernels.__file__)\n")
    r = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.stdout.strip() == str(ROOT / "kernels" / "__init__.py")


def _layout_block() -> str:
    return (ROOT / "docs" / "layout.md").read_text().split("```", 2)[1]


def test_docs_layout_names_every_module():
    """Each folder line of docs/layout.md lists exactly the modules (and subfolders) on disk."""
    entries, current = {}, None
    for line in _layout_block().splitlines():
        m = re.match(r"^(\S+/)\s+(.*)$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2)
        elif current and line.startswith(" "):
            entries[current] += " " + line.strip()
    for folder, text in entries.items():
        path = ROOT / folder
        assert path.is_dir(), f"docs/layout.md names {folder}, which does not exist"
        if folder.split("/")[0] not in ROOMS + ("longctx",):
            continue
        named = set(re.findall(r"([A-Za-z_]\w*\.py)\b", text))
        on_disk = {p.name for p in path.glob("*.py") if p.name != "__init__.py" or folder == "longctx/"}
        # a subfolder's modules are named on its own line, or after "name/" on this one
        for sub in path.iterdir():
            if (sub / "__init__.py").exists() and f"{folder}{sub.name}/" not in entries:
                on_disk |= {p.name for p in sub.glob("*.py") if p.name != "__init__.py"}
        assert named == on_disk, f"docs/layout.md, {folder}: names {sorted(named)}, on disk {sorted(on_disk)}"
    packages = {str(p.parent.relative_to(ROOT)) + "/" for room in ROOMS for p in (ROOT / room).rglob("__init__.py")}
    covered = {f for f in packages if f in entries or any(f.startswith(e) and f"{Path(f).name}/" in entries[e]
                                                          for e in entries)}
    assert covered == packages, f"docs/layout.md misses {sorted(packages - covered)}"


def test_ruff_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 0, r.stdout[-5000:]


def _namespace_as_installed(view: Path) -> Path:
    """`longctx` as the wheel lays it out (one folder holding every room), made of links to this checkout, with the
    contracts beside it. import-linter reads a package from the folder of its __init__.py alone, and the checkout
    keeps the rooms beside `longctx/`, not in it."""
    (view / "longctx").mkdir(parents=True)
    for f in (ROOT / "longctx").glob("*.py"):
        (view / "longctx" / f.name).symlink_to(f)
    for room in ROOMS:
        (view / "longctx" / room).symlink_to(ROOT / room, target_is_directory=True)
    (view / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    return view


def test_import_contracts(tmp_path):
    """docs/ARCHITECTURE.md's dependency direction, as pyproject.toml's import-linter contracts; an import inside a
    function counts as one at the top."""
    lint = Path(sys.executable).with_name("lint-imports")
    lint = str(lint) if lint.exists() else shutil.which("lint-imports")
    assert lint, "no lint-imports: install the dev tools (pip install -e '.[dev]' installs import-linter)"
    r = subprocess.run([lint, "--no-cache"], capture_output=True, text=True, timeout=300,
                       cwd=_namespace_as_installed(tmp_path / "installed"), env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
