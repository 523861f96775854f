"""packaging/yocto/edgemesh_0.1.0.bb against the repository and what its build class builds:
the license checksum against the file it names, every file ``do_install`` copies from the
source tree, the version and console script against setup.cfg and the wheel that
``python_setuptools_build_meta`` (PEP 517, setuptools.build_meta) builds from the git-tracked
files, as bitbake's git fetch of SRCREV would see them. No bitbake here: the recipe itself has
not been through a Yocto build."""
from __future__ import annotations

import configparser
import hashlib
import os
import re
import shlex
import subprocess
import sys
import tarfile
import zipfile

import pytest

from edgemesh import __version__
from tests.procs import ROOT

RECIPE = os.path.join(ROOT, "packaging", "yocto", "edgemesh_0.1.0.bb")
# what the recipe's ${...} install paths are in OE-core's default layout (bitbake.conf)
OE_PATHS = {"${D}": "", "${systemd_system_unitdir}": "/lib/systemd/system",
            "${sysconfdir}": "/etc", "${bindir}": "/usr/bin"}


def recipe_vars(text: str) -> dict[str, str]:
    """``NAME = "value"`` / ``?=`` / ``+=`` assignments (continuation lines joined); ``+=``
    appends. Enough of bitbake's syntax for this recipe."""
    out: dict[str, str] = {}
    joined = re.sub(r"\\\n", " ", text)
    for m in re.finditer(r'^([A-Za-z_][\w:${}]*)\s*(\?=|\+=|=)\s*"([^"]*)"', joined, re.M):
        name, op, value = m.groups()
        value = " ".join(value.split())
        if op == "+=":
            out[name] = f"{out.get(name, '')} {value}".strip()
        elif op == "=" or name not in out:
            out[name] = value
    return out


def oe_path(path: str) -> str:
    for var, value in OE_PATHS.items():
        path = path.replace(var, value)
    return path


def do_install(text: str) -> list[tuple[str, str, str]]:
    """(mode, source relative to ${S}, installed path) of every ``install -m`` in do_install."""
    body = text.split("do_install:append() {", 1)[1].split("\n}", 1)[0]
    out = []
    for line in body.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["install", "-m"]:
            mode, src, dest = words[2], words[3], words[4]
            assert src.startswith("${S}/"), src
            dest = oe_path(dest)
            if dest.endswith("/"):
                dest += os.path.basename(src)
            out.append((mode, src[len("${S}/"):], dest))
    return out


@pytest.fixture(scope="module")
def text() -> str:
    with open(RECIPE, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def tracked() -> set[str]:
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout: the files bitbake's git fetch sees are unknown")
    return set(r.stdout.decode().split("\0")) - {""}


@pytest.fixture(scope="module")
def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return cfg


def test_license_checksum_is_the_repositorys_license_file(text: str, tracked: set[str],
                                                          setup_cfg) -> None:
    v = recipe_vars(text)
    assert v["LICENSE"] == setup_cfg["metadata"]["license"] == "Apache-2.0"
    entries = re.findall(r"file://([^;\s]+);md5=([0-9a-f]{32})", v["LIC_FILES_CHKSUM"])
    assert entries, v["LIC_FILES_CHKSUM"]
    for path, md5 in entries:
        assert not path.startswith("${"), f"{path}: not the source's own license file"
        assert path in tracked, f"{path} is not in the repository (bitbake fetches git)"
        with open(os.path.join(ROOT, path), "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == md5, path  # noqa: S324 (bitbake's)


def test_every_installed_file_exists_and_is_packaged(text: str, tracked: set[str]) -> None:
    v = recipe_vars(text)
    installed = do_install(text)
    assert {src for _, src, _ in installed} == {
        "packaging/systemd/edgemesh-agent.service", "packaging/systemd/edgemesh-server.service",
        "packaging/sysctl.d/60-edgemesh.conf"}
    for mode, src, dest in installed:
        assert src in tracked, f"{src}: installed by the recipe, not in the repository"
        assert mode == "0644", src
        files = [oe_path(p) for p in v["FILES:${PN}"].split()]
        assert any(dest.startswith(d + "/") for d in files), f"{dest} not in FILES:${{PN}}"
    units = {os.path.basename(dest) for _, _, dest in installed if dest.endswith(".service")}
    assert set(v["SYSTEMD_SERVICE:${PN}"].split()) == units
    conffiles = {oe_path(c) for c in v["CONFFILES:${PN}"].split()}
    assert conffiles <= {dest for _, _, dest in installed}


def test_units_run_the_console_script_setup_cfg_declares(text: str, setup_cfg) -> None:
    scripts = setup_cfg["options.entry_points"]["console_scripts"].split("\n")
    assert [s.strip() for s in scripts if s.strip()] == ["edgemesh = edgemesh.cli:entry"]
    from edgemesh import cli
    assert callable(cli.entry)
    for _, src, _ in do_install(text):
        if src.endswith(".service"):
            with open(os.path.join(ROOT, src), encoding="utf-8") as f:
                (exec_start,) = re.findall(r"^ExecStart=(\S+)", f.read(), re.M)
            assert exec_start == "/usr/bin/edgemesh", src  # ${bindir}/ + the script's name


def test_version_is_the_packages(text: str) -> None:
    name, pv = os.path.basename(RECIPE)[:-3].split("_")
    assert (name, pv) == ("edgemesh", __version__)
    assert "PV" not in recipe_vars(text)  # taken from the file name


def test_source_is_git_at_a_revision_not_a_checksummed_tarball(text: str) -> None:
    """bitbake checks a tarball's ``sha256sum``; a git SRC_URI is pinned by SRCREV instead.
    This recipe fetches git, so there is no archive checksum to compare with an sdist."""
    v = recipe_vars(text)
    uri = v["EDGEMESH_SRC_URI"]
    assert v["SRC_URI"] == "${EDGEMESH_SRC_URI}" and uri.startswith("git://"), uri
    assert "SRCREV" in v and v["S"] == "${WORKDIR}/git"
    assert "sha256sum" not in text and not re.search(r"\.(tar\.gz|zip|whl)\b", uri)


BUILD = """
import importlib.util, sys
from setuptools import build_meta
wheel = importlib.util.find_spec("wheel") is not None
print(build_meta.build_wheel(sys.argv[1]) if wheel else build_meta.build_sdist(sys.argv[1]))
"""


def built_metadata(src: str, out: str) -> dict[str, str]:
    """Build ``src`` with setuptools.build_meta (PEP 517, in this venv: no network): the wheel
    python_setuptools_build_meta builds, or, where this venv lacks ``wheel``, the sdist (the
    same metadata, from the same setup.cfg). Returns {member basename: text} of its metadata."""
    r = subprocess.run([sys.executable, "-c", BUILD, out], cwd=src, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    name = r.stdout.split()[-1]
    assert name.startswith(f"edgemesh-{__version__}"), name
    wanted = ("METADATA", "PKG-INFO", "entry_points.txt", "requires.txt", "LICENSE")
    found: dict[str, str] = {"artifact": name}
    if name.endswith(".whl"):
        with zipfile.ZipFile(os.path.join(out, name)) as z:
            for n in z.namelist():
                if os.path.basename(n) in wanted and ".dist-info/" in n:
                    found[os.path.basename(n)] = z.read(n).decode()
            found["modules"] = "\n".join(z.namelist())
    else:
        with tarfile.open(os.path.join(out, name)) as tar:
            for m in tar:
                base = os.path.basename(m.name)
                f = tar.extractfile(m) if m.isfile() else None
                if f is not None and base in wanted and base not in found:
                    found[base] = f.read().decode()
            found["modules"] = "\n".join(m.name.split("/", 1)[-1] for m in tar)
    return found


@pytest.mark.slow
def test_what_the_build_class_builds_matches_the_recipe(text: str, tracked: set[str],
                                                        tmp_path) -> None:
    """The git-tracked files, as ``${S}`` after bitbake's git fetch, built as
    python_setuptools_build_meta does: the recipe's version, the console script the units
    run, the license file, and the requirements RDEPENDS maps to meta-python packages."""
    src = tmp_path / "git"
    for rel in tracked:
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(ROOT, rel), "rb") as f:
            dest.write_bytes(f.read())
    (tmp_path / "out").mkdir()
    meta = built_metadata(str(src), str(tmp_path / "out"))
    assert "[console_scripts]\nedgemesh = edgemesh.cli:entry" in meta["entry_points.txt"]
    info = meta.get("METADATA") or meta["PKG-INFO"]
    assert f"\nVersion: {__version__}\n" in info and "\nLicense: Apache-2.0\n" in info
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert meta["LICENSE"] == f.read()
    assert "edgemesh/tunnel/module.py" in meta["modules"].splitlines()
    requires = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)$", info, re.M) or \
        meta["requires.txt"].split("\n\n")[0].split()
    rdepends = recipe_vars(text)["RDEPENDS:${PN}"].split()
    assert requires
    for req in requires:
        assert f"python3-{req.lower()}" in rdepends, req
