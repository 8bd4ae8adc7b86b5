"""Where the toolkit's inputs and outputs live."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def _is_checkout(root: Path) -> bool:
    """Whether `root` is a kvgen source checkout (its pyproject.toml names the
    kvgen project), not just any folder the package happens to sit in."""
    import tomllib

    try:
        return tomllib.loads((root / "pyproject.toml").read_text()).get("project", {}).get("name") == "kvgen"
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


# In a checkout (an editable install included) the build inputs and outputs are
# <repo>/templates and <repo>/generated; in an installed wheel they are the
# package data `kvgen.templates` and `kvgen.generated`.
IN_CHECKOUT = _is_checkout(REPO_DIR)


def _package_data(package: str, folder: str) -> Path:
    import importlib.util

    from .errors import UsageError

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"no {folder}/ tree found: neither a kvgen checkout at {REPO_DIR} "
                         f"nor the package data {package} (reinstall kvgen)")
    return Path(list(spec.submodule_search_locations)[0])


def templates_dir() -> Path:
    """The jinja2 templates: <repo>/templates in a checkout, else the `kvgen.templates` package data."""
    return REPO_DIR / "templates" if IN_CHECKOUT else _package_data("kvgen.templates", "templates")


def generated_dir() -> Path:
    """The generated tree: sources, cubins, manifest.

    KVGEN_GENERATED_DIR overrides it (tests build into a temporary folder).
    In a checkout it is <repo>/generated; in an installed wheel it is the
    `kvgen.generated` package data.
    """
    override = os.environ.get("KVGEN_GENERATED_DIR")
    if override:
        return Path(override)
    return REPO_DIR / "generated" if IN_CHECKOUT else _package_data("kvgen.generated", "generated")


KERNELS_PACKAGE = "kvgen_kernels"  # generated/<this>/: the rendered CuteDSL modules
def helpers_file(flavour: str) -> str:
    """generated/<KERNELS_PACKAGE>/<this>: one flavour of the inline-PTX helpers (kvgen.config.FLAVOURS)."""
    return f"ptx_helpers_{flavour}.py"
MANIFEST_NAME = "manifest.json"
