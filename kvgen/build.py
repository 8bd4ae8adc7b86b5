"""Generate and build: config matrix -> generated sources -> cubins + manifest.

`generate` renders every config of the matrix into generated/kvgen_kernels/.
`build` compiles each generated module with CuteDSL, links its PTX into a
cubin with nvJitLink, and records it in generated/manifest.json. Builds run in
parallel processes and skip a config whose build key (the hash of everything
that goes into its cubin) matches the manifest's and whose cubin is intact.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterable

from .config import DequantGatherConfig, build_matrix
from .manifest import read_manifest, sha256_file, write_manifest, ManifestError
from .paths import KERNELS_PACKAGE, MANIFEST_NAME, generated_dir

HELPERS_FILE = "ptx_helpers.py"


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def generate(configs: Iterable[DequantGatherConfig] | None = None, out_dir: Path | None = None,
             prune: bool = True) -> list[Path]:
    """Render sources; with `prune`, remove generated sources no config asks for
    (only right when `configs` is the whole matrix). Returns changed files."""
    from .render import render_helpers, render_kernel

    out_dir = out_dir or generated_dir()
    configs = list(configs if configs is not None else build_matrix())
    kernels_dir = out_dir / KERNELS_PACKAGE
    wanted = {
        out_dir / "__init__.py": '"""Generated kvgen artefacts: cubins and manifest (package data)."""\n',
        kernels_dir / "__init__.py": '"""Generated CuteDSL kernel modules (build inputs, kept for review)."""\n',
        kernels_dir / HELPERS_FILE: render_helpers(),
    }
    for config in configs:
        wanted[kernels_dir / config.filename] = render_kernel(config)
    changed = [path for path, text in wanted.items() if _write_if_changed(path, text)]
    for stale in kernels_dir.glob("*.py") if prune else ():
        if stale not in wanted:
            stale.unlink()
            changed.append(stale)
    return changed


def build_key(source_sha: str, helpers_sha: str, arch: str, toolchain: dict[str, str]) -> str:
    blob = json.dumps([source_sha, helpers_sha, arch, toolchain], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class BuildError(RuntimeError):
    pass


def _build_one(out_dir: str, config_dict: dict[str, Any], toolchain: dict[str, str], key: str) -> dict[str, Any]:
    """Runs in a worker process; errors come back as plain text (CuteDSL's do not pickle)."""
    try:
        return _build_row(out_dir, config_dict, toolchain, key)
    except Exception as err:  # noqa: BLE001 - re-raised with its text, in the parent
        raise BuildError(f"{DequantGatherConfig.from_dict(config_dict).name}: {type(err).__name__}: {err}") from None


def _build_row(out_dir: str, config_dict: dict[str, Any], toolchain: dict[str, str], key: str) -> dict[str, Any]:
    """Compile + link one config, write its cubin, return its manifest row."""
    from .compile import compile_module
    from .link import link_ptx

    config = DequantGatherConfig.from_dict(config_dict)
    root = Path(out_dir)
    compiled = compile_module(root, config.name, config.arch)
    linked = link_ptx(compiled.ptx, config.arch)
    cubin_rel = f"cubins/{config.arch}/{config.name}.cubin"
    cubin_path = root / cubin_rel
    cubin_path.parent.mkdir(parents=True, exist_ok=True)
    cubin_path.write_bytes(linked.cubin)
    source_rel = f"{KERNELS_PACKAGE}/{config.filename}"
    return {
        "name": config.name,
        "config": config.to_dict(),
        "arch": config.arch,
        "symbol": compiled.symbol,
        "params": [{"name": n, "ctype": t} for n, t in compiled.params],
        "block": [compiled.threads, 1, 1],
        "smem_bytes": compiled.smem_bytes,
        "registers": linked.registers,
        "spill_bytes": linked.spill_bytes,
        "stack_bytes": linked.stack_bytes,
        "cubin": cubin_rel,
        "cubin_sha256": sha256_file(cubin_path),
        "source": source_rel,
        "source_sha256": sha256_file(root / source_rel),
        "helpers_sha256": sha256_file(root / KERNELS_PACKAGE / HELPERS_FILE),
        "build_key": key,
        "toolchain": toolchain,
    }


def build(configs: Iterable[DequantGatherConfig] | None = None, out_dir: Path | None = None,
          jobs: int | None = None, progress: bool = True, force: bool = False,
          only: Iterable[str] | None = None) -> dict[str, int]:
    """Compile and link every config (default: the build matrix); returns
    {"built": n, "skipped": m}. With `only` (kernel names), build just those
    and keep every other row, source and cubin as it is."""
    from .link import toolchain_versions

    out_dir = out_dir or generated_dir()
    configs = list(configs if configs is not None else build_matrix())
    generate(configs, out_dir)
    kept: list[DequantGatherConfig] = []
    if only is not None:
        only = set(only)
        kept = [c for c in configs if c.name not in only]
        configs = [c for c in configs if c.name in only]
    toolchain = toolchain_versions()
    manifest_path = out_dir / MANIFEST_NAME
    try:
        previous = {row["name"]: row for row in read_manifest(manifest_path)["kernels"]}
    except ManifestError:
        previous = {}
    helpers_sha = sha256_file(out_dir / KERNELS_PACKAGE / HELPERS_FILE)

    rows: dict[str, dict[str, Any]] = {c.name: previous[c.name] for c in kept if c.name in previous}
    todo: list[tuple[DequantGatherConfig, str]] = []
    for config in configs:
        source_sha = sha256_file(out_dir / KERNELS_PACKAGE / config.filename)
        key = build_key(source_sha, helpers_sha, config.arch, toolchain)
        old = previous.get(config.name)
        cubin = out_dir / old["cubin"] if old else None
        if (not force and old and old.get("build_key") == key and cubin.exists()
                and sha256_file(cubin) == old["cubin_sha256"]):
            rows[config.name] = old
        else:
            todo.append((config, key))

    if todo:
        jobs = jobs or max(1, min(len(todo), os.cpu_count() or 1))
        # spawn: workers import CuteDSL fresh rather than fork MLIR state.
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            pending = [pool.submit(_build_one, str(out_dir), c.to_dict(), toolchain, key) for c, key in todo]
            iterator = futures.as_completed(pending)
            if progress:
                from tqdm import tqdm

                iterator = tqdm(iterator, total=len(pending), desc="kvgen build", unit="kernel")
            for done in iterator:
                row = done.result()
                rows[row["name"]] = row

    # Remove cubins that no config asks for any more.
    wanted = {out_dir / row["cubin"] for row in rows.values()}
    for stale in (out_dir / "cubins").glob("*/*.cubin"):
        if stale not in wanted:
            stale.unlink()
    write_manifest(manifest_path, list(rows.values()))
    return {"built": len(todo), "skipped": len(configs) - len(todo)}
