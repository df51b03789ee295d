"""A wheel install works outside the checkout (issue 27): the bundled spaces are package data,
and ``nas search`` / ``nas front`` run from a folder that has no ``search_spaces/``."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh venv holding only the built wheel; the other dependencies are read from this
    environment's site-packages (a .pth line: its own .pth files, the editable install of this
    checkout among them, are not processed there)."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(root / "dist")], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = (root / "dist").glob("nas-*.whl")
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)  # (ensurepip: offline)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    inst = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr
    return wheel, env_dir


def test_the_wheel_carries_the_bundled_spaces(wheel_env):
    wheel, _ = wheel_env
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = {f"nas/search_spaces/{p.name}" for p in (REPO / "search_spaces").glob("*.yaml")}
    assert bundled and bundled <= names


@pytest.mark.slow  # a long multi-process run: deselected by default, CI runs it (`pytest -m slow`)
def test_search_and_front_from_a_wheel_install_outside_the_checkout(wheel_env, tmp_path):
    _, env_dir = wheel_env
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    nas = str(env_dir / "bin" / "nas")
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import nas; print(nas.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.stdout.startswith(str(env_dir)), where  # the installed copy, not this checkout
    search = subprocess.run([nas, "search", "--trials", "2", "--epochs", "1", "--study", "w", "--quiet"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert search.returncode == 0, search.stderr
    front = subprocess.run([nas, "front", "w", "--format", "csv"], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=300)
    assert front.returncode == 0, front.stderr
    assert front.stdout.splitlines()[0].startswith("trial,") and len(front.stdout.splitlines()) >= 2


def test_a_local_search_spaces_folder_never_shadows_a_bundled_name_silently(in_tmp, capsys):
    from nas.space import SPACES_DIR, resolve_space_path

    (in_tmp / "search_spaces").mkdir()
    (in_tmp / "search_spaces" / "default.yaml").write_text("name: mine\nstem_channels: 8\nstages:\n"
                                                           "  - block: conv\n    width: 8\n")
    (in_tmp / "search_spaces" / "own.yaml").write_text("name: own\nstem_channels: 8\nstages:\n"
                                                       "  - block: conv\n    width: 8\n")
    assert resolve_space_path("default") == SPACES_DIR / "default.yaml"
    assert "space 'default' is the bundled one; search_spaces/default.yaml differs" in capsys.readouterr().err
    assert resolve_space_path("own") == Path("search_spaces") / "own.yaml"  # a name of the user's own
    assert resolve_space_path("search_spaces/default.yaml") == Path("search_spaces/default.yaml")
