"""Generate and build a kernel tree: configs -> rendered sources -> cubins + manifest.

`generate` renders each config into <tree>/kvgen_kernels/. `build` compiles
each generated module with CuteDSL, links its PTX into a cubin with
nvJitLink, and records it in <tree>/manifest.json, with the formats its rows
use. Builds run in parallel processes and skip a config whose build key (the
hash of everything that goes into its cubin) matches the manifest's and whose
cubin is intact. The configs come from a spec (kvgen/spec.py); by default
the shipped one, into the shipped tree (generated/).

Neither removes anything it was not asked about: building a subset leaves
every other source, cubin and manifest row of the tree as it was, and no
other tree is touched. Removing what the spec no longer asks for is `prune`,
a separate, explicit act.
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterable

from ..families import FAMILIES
from ..formats import Format
from ..config import FLAVOURS
from ..paths import KERNELS_PACKAGE, MANIFEST_NAME, generated_dir, helpers_file
from ..runtime.manifest import ManifestError, read_manifest, sha256_file, write_manifest
from ..spec import SHIPPED_SPEC, load_spec


def shipped_configs() -> tuple:
    """The configs of the shipped spec (kvgen/specs/shipped.toml)."""
    return load_spec(SHIPPED_SPEC).configs


def _previous(manifest_path: Path) -> tuple[list[dict[str, Any]], dict[str, Format]]:
    """The rows and formats of a tree's manifest; none where it has no manifest
    yet. A manifest that cannot be read is an error: building or pruning over it
    would drop every row it holds."""
    if not manifest_path.exists():
        return [], {}
    data = read_manifest(manifest_path)
    formats = {name: Format.from_dict({**fields, "name": name}) for name, fields in data["formats"].items()}
    return data["kernels"], formats


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def generate(configs: Iterable | None = None, out_dir: Path | None = None) -> list[Path]:
    """Render the sources of `configs` (default: the shipped spec's); returns the
    files written. Sources of other configs are kept (see `prune`)."""
    from .render import render_helpers, render_kernel

    out_dir = out_dir or generated_dir()
    configs = list(configs if configs is not None else shipped_configs())
    kernels_dir = out_dir / KERNELS_PACKAGE
    wanted = {
        out_dir / "__init__.py": '"""A kvgen kernel tree: cubins and manifest (package data)."""\n',
        kernels_dir / "__init__.py": '"""Generated CuteDSL kernel modules (build inputs, kept for review)."""\n',
        **{kernels_dir / helpers_file(flavour): render_helpers(flavour) for flavour in FLAVOURS},
    }
    for config in configs:
        wanted[kernels_dir / config.filename] = render_kernel(config)
    return [path for path, text in wanted.items() if _write_if_changed(path, text)]


def prune(configs: Iterable | None = None, out_dir: Path | None = None) -> list[Path]:
    """Remove the generated sources, cubins and manifest rows that no config of
    `configs` (default: the shipped spec's) asks for; returns what was removed
    (a manifest row as `manifest.json#<name>`)."""
    out_dir = out_dir or generated_dir()
    names = {c.name for c in (configs if configs is not None else shipped_configs())}
    kernels_dir = out_dir / KERNELS_PACKAGE
    keep_sources = ({kernels_dir / "__init__.py"} | {kernels_dir / helpers_file(f) for f in FLAVOURS}
                    | {kernels_dir / f"{n}.py" for n in names})
    removed = [path for path in sorted(kernels_dir.glob("*.py")) if path not in keep_sources]
    manifest_path = out_dir / MANIFEST_NAME
    rows, formats = _previous(manifest_path)
    kept_rows = [row for row in rows if row["name"] in names]
    keep_images = {out_dir / row["cubin"] for row in kept_rows}
    images = sorted([*(out_dir / "cubins").glob("*/*.cubin"), *(out_dir / "ptx").glob("*/*.ptx")])
    removed += [path for path in images if path not in keep_images]
    for path in removed:
        path.unlink()
    if len(kept_rows) != len(rows):
        write_manifest(manifest_path, kept_rows, formats)
        removed += [Path(f"{manifest_path}#{row['name']}") for row in rows if row["name"] not in names]
    return removed


def build_key(source_sha: str, helpers_sha: str, arch: str, toolchain: dict[str, str]) -> str:
    blob = json.dumps([source_sha, helpers_sha, arch, toolchain], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class BuildError(RuntimeError):
    pass


def _build_one(out_dir: str, family: str, config_dict: dict[str, Any], toolchain: dict[str, str],
               key: str) -> dict[str, Any]:
    """Runs in a worker process; errors come back as plain text (CuteDSL's do not pickle)."""
    config = FAMILIES[family].from_dict(config_dict)
    try:
        return _build_row(out_dir, config, toolchain, key)
    except Exception as err:  # noqa: BLE001 - re-raised with its text, in the parent
        raise BuildError(f"{config.name}: {type(err).__name__}: {err}") from None


def _build_row(out_dir: str, config, toolchain: dict[str, str], key: str) -> dict[str, Any]:
    """Compile + link one config, write its cubin, return its manifest row."""
    from .compile import compile_module
    from .link import link_ptx

    root = Path(out_dir)
    compiled = compile_module(root, config.name, config.arch)
    # Linked for its lowest GPU even where the PTX itself is the image: the PTX is
    # assembled here (an error now, not on a user's GPU) and its resources recorded.
    linked = link_ptx(compiled.ptx, config.arch_row.gpu_arch if config.arch_row.ptx else config.arch)
    resources = {"registers": linked.registers, "spill_bytes": linked.spill_bytes, "stack_bytes": linked.stack_bytes}
    if config.arch_row.ptx:  # a PTX fallback: the driver JIT-compiles it for the GPU it meets
        image_rel, image = f"ptx/{config.arch}/{config.name}.ptx", compiled.ptx.encode()
    else:
        image_rel, image = f"cubins/{config.arch}/{config.name}.cubin", linked.cubin
    image_path = root / image_rel
    image_path.parent.mkdir(parents=True, exist_ok=True)
    image_path.write_bytes(image)
    source_rel = f"{KERNELS_PACKAGE}/{config.filename}"
    return {
        "name": config.name,
        "family": config.family,
        "config": {**config.to_dict(), "format": config.format.name},  # the format itself: the formats table
        "arch": config.arch,
        "symbol": compiled.symbol,
        "params": [{"name": n, "ctype": t} for n, t in compiled.params],
        "block": [compiled.threads, 1, 1],
        "smem_bytes": compiled.smem_bytes,
        **resources,  # for a PTX row: as linked for its lowest GPU (the driver's JIT may differ)
        "cubin": image_rel,  # the image: a cubin, or PTX for a compute_* arch
        "cubin_sha256": sha256_file(image_path),
        "source": source_rel,
        "source_sha256": sha256_file(root / source_rel),
        "flavour": config.arch_row.flavour,
        "helpers_sha256": sha256_file(root / KERNELS_PACKAGE / helpers_file(config.arch_row.flavour)),
        "build_key": key,
        "toolchain": toolchain,
    }


def build(configs: Iterable | None = None, out_dir: Path | None = None,
          jobs: int | None = None, progress: bool = True, force: bool = False) -> dict[str, int]:
    """Compile and link `configs` (default: the shipped spec's) into the tree at
    `out_dir` (default: the shipped tree); returns {"built": n, "skipped": m}.
    Every other manifest row, source and cubin of the tree is kept as it is
    (see `prune`), and no other tree is touched."""
    from .link import toolchain_versions

    if jobs is not None and (type(jobs) is not int or jobs < 1):
        raise ValueError(f"jobs: expected a positive int, got {jobs!r}")
    out_dir = out_dir or generated_dir()
    configs = list(configs if configs is not None else shipped_configs())
    manifest_path = out_dir / MANIFEST_NAME
    previous_rows, formats = _previous(manifest_path)
    previous = {row["name"]: row for row in previous_rows}
    # Checked before anything is written: a tree's formats are told apart by record size.
    for config in configs:
        known = formats.get(config.format.name, config.format)
        same_size = next((f for f in formats.values() if f.record_bytes == config.format.record_bytes
                          and f.name != config.format.name), None)
        if known != config.format or same_size is not None:
            other = same_size or known
            raise ManifestError(f"{manifest_path}: this tree already defines format {other.name} "
                                f"({other.record_bytes}-byte records) otherwise than the spec's "
                                f"{config.format.name}; build into another folder")
        formats[config.format.name] = config.format
    generate(configs, out_dir)
    toolchain = toolchain_versions()
    helpers_sha = {f: sha256_file(out_dir / KERNELS_PACKAGE / helpers_file(f)) for f in FLAVOURS}

    rows: dict[str, dict[str, Any]] = dict(previous)  # rows not built here are kept
    todo: list[tuple[Any, str]] = []
    for config in configs:
        source_sha = sha256_file(out_dir / KERNELS_PACKAGE / config.filename)
        key = build_key(source_sha, helpers_sha[config.arch_row.flavour], config.arch, toolchain)
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
            pending = [pool.submit(_build_one, str(out_dir), c.family, c.to_dict(), toolchain, key) for c, key in todo]
            iterator = futures.as_completed(pending)
            if progress:
                from tqdm import tqdm

                iterator = tqdm(iterator, total=len(pending), desc="kvgen build", unit="kernel")
            try:
                for done in iterator:
                    row = done.result()
                    rows[row["name"]] = row
            finally:  # a failed kernel fails the build, but the rows built before it are recorded
                write_manifest(manifest_path, list(rows.values()), formats)

    write_manifest(manifest_path, list(rows.values()), formats)
    return {"built": len(todo), "skipped": len(configs) - len(todo)}
