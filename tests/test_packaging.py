"""The wheel ships the CLI and the presets inside the medtransfer package (non-editable installs)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_cli_and_presets(tmp_path):
    # built from a clean copy of the sources: a stale build/ folder of the checkout must not fill the gaps
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for name in ("medtransfer", "cli", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    wheel = next(tmp_path.glob("medtransfer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "medtransfer/configs/xray.yaml" in names
    assert "medtransfer/cli/main.py" in names
    assert "medtransfer/io/dicom.py" in names
    assert "medtransfer/configs/segmentation/mri.yaml" in names
    assert "medtransfer/__main__.py" in names
    # every module of the source tree is in the wheel (a subpackage missing from pyproject's list is not)
    sources = {f"medtransfer/{p.relative_to(ROOT / 'medtransfer').as_posix()}" for p in (ROOT / "medtransfer").rglob("*.py")}
    sources |= {f"medtransfer/cli/{p.name}" for p in (ROOT / "cli").glob("*.py")}
    assert sorted(sources - names) == []
    top = {n.split("/")[0] for n in names}
    # nothing but the medtransfer package (and its metadata) goes into site-packages
    assert {t for t in top if not t.endswith(".dist-info")} == {"medtransfer"}
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "medtransfer = medtransfer.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "medtransfer", "--help"], capture_output=True, text=True, check=True)
    assert "finetune" in out.stdout and "predict" in out.stdout
