"""Where the toolkit's inputs and outputs live."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
TEMPLATES_DIR = REPO_DIR / "templates"


def generated_dir() -> Path:
    """The generated tree: sources, cubins, manifest.

    KVGEN_GENERATED_DIR overrides it (tests build into a temporary folder).
    In a checkout it is <repo>/generated; in an installed wheel it is the
    `kvgen.generated` package data.
    """
    override = os.environ.get("KVGEN_GENERATED_DIR")
    if override:
        return Path(override)
    in_repo = REPO_DIR / "generated"
    if in_repo.is_dir():
        return in_repo
    import importlib.util

    spec = importlib.util.find_spec("kvgen.generated")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("kvgen: no generated/ tree found (was the package built?)")
    return Path(list(spec.submodule_search_locations)[0])


KERNELS_PACKAGE = "kvgen_kernels"  # generated/<this>/: the rendered CuteDSL modules
MANIFEST_NAME = "manifest.json"
