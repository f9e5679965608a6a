"""The installed API is one namespace, `longctx`, that coexists with unrelated packages named like
our rooms (Hugging Face's `kernels`); README's Layout names every module; the code is lint-clean."""
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("kernels", "data", "pipeline", "launch")


def _run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, ROOT])
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


def test_wheel_beside_a_package_named_kernels(wheel, tmp_path):
    """A fresh virtualenv with the wheel and another distribution's top-level `kernels`: both import."""
    other = tmp_path / "other"
    (other / "kernels").mkdir(parents=True)
    (other / "kernels" / "__init__.py").write_text("WHO = 'someone else'\n")
    (other / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = '
                                          '"setuptools.build_meta"\n[project]\nname = "kernels"\nversion = "1.0"\n'
                                          '[tool.setuptools]\npackages = ["kernels"]\n')
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=False)   # torch & co. from this interpreter
    py = env_dir / "bin" / "python"
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
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_readme_layout_names_every_module():
    """Each folder line of README's Layout lists exactly the modules (and subfolders) on disk."""
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
        assert path.is_dir(), f"README Layout names {folder}, which does not exist"
        if folder.split("/")[0] not in ROOMS + ("longctx",):
            continue
        named = set(re.findall(r"([A-Za-z_]\w*\.py)\b", text))
        on_disk = {p.name for p in path.glob("*.py") if p.name != "__init__.py" or folder == "longctx/"}
        # a subfolder's modules are named on its own line, or after "name/" on this one
        for sub in path.iterdir():
            if (sub / "__init__.py").exists() and f"{folder}{sub.name}/" not in entries:
                on_disk |= {p.name for p in sub.glob("*.py") if p.name != "__init__.py"}
        assert named == on_disk, f"README Layout, {folder}: names {sorted(named)}, on disk {sorted(on_disk)}"
    packages = {str(p.parent.relative_to(ROOT)) + "/" for room in ROOMS for p in (ROOT / room).rglob("__init__.py")}
    covered = {f for f in packages if f in entries or any(f.startswith(e) and f"{Path(f).name}/" in entries[e]
                                                          for e in entries)}
    assert covered == packages, f"README Layout misses {sorted(packages - covered)}"


def test_ruff_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 0, r.stdout[-5000:]
