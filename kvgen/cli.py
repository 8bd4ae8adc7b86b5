"""python -m kvgen generate | build | prune | list | demo | bench | tune"""

from __future__ import annotations

import argparse
import sys

# No torch here, nor anything that imports it: `--help` and argument errors
# answer at once; each command imports what it needs.
from .config import ARCHS, ConfigError
from .errors import UsageError

BUILD_EXTRAS = "pip install 'kvgen[build]'"
# `kvgen tune --family`: bench.FAMILIES' and bench_formats.TUNE_FAMILIES' names (not
# imported here: they load torch), all tuned when none is named.
TUNE_FAMILIES = ("dsv4", "v41", "sparse", "writer", "raw", "dense_formats", "sparse_formats", "packed_formats")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line, `kvgen: error: ...`, exit status 2."""

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _need(command: str, modules: dict[str, str]) -> None:
    """Refuse `command` in one line where a package of the build extras is
    missing (`modules`: distribution -> module it provides)."""
    import importlib.util

    def importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False

    missing = [dist for dist, module in modules.items() if not importable(module)]
    if missing:
        raise UsageError(f"{command} needs the build extras ({', '.join(missing)} not installed): {BUILD_EXTRAS}")


def _spec(args):
    """The spec a command works from: --spec FILE, else the shipped one."""
    from .spec import SHIPPED_SPEC, load_spec

    return load_spec(args.spec or SHIPPED_SPEC)


def _tree(args):
    """The tree a command writes: --out DIR; the shipped tree only for the shipped spec."""
    from pathlib import Path

    from .paths import generated_dir

    if args.out:
        return Path(args.out)
    if args.spec:
        raise UsageError("--spec needs --out DIR: a user's spec builds its own tree, never the shipped one")
    return generated_dir()


def _configs(args) -> list:
    """The spec's configs, or the named kernels (--kernel NAME, repeatable), for --arch if given."""
    configs = list(_spec(args).configs)
    if getattr(args, "kernel", None):
        by_name = {c.name: c for c in configs}
        unknown = [n for n in args.kernel if n not in by_name]
        if unknown:
            raise ConfigError(f"unknown kernel name(s): {', '.join(unknown)} (not in the spec; "
                              "see `python -m kvgen list`)")
        configs = [by_name[n] for n in args.kernel]
    arch = getattr(args, "arch", None)
    return [c for c in configs if not arch or c.arch == arch]


def _check_arch(args) -> None:
    if args.arch and args.arch not in ARCHS:
        raise ConfigError(f"unknown arch {args.arch!r}; known: {', '.join(sorted(ARCHS))}")


def cmd_generate(args) -> int:
    _need("generate", {"jinja2": "jinja2"})
    from .build.tree import generate

    _check_arch(args)
    tree = _tree(args)
    return _report("generate", generate(_configs(args), tree), "changed")


def cmd_build(args) -> int:
    _check_arch(args)
    _need("build", {"jinja2": "jinja2", "nvidia-cutlass-dsl": "cutlass", "cuda-core": "cuda.core",
                    **({} if args.quiet else {"tqdm": "tqdm"})})
    from .build.tree import build

    tree = _tree(args)
    # Only the selected kernels are (re)built; every other row of the tree stays.
    result = build(_configs(args), tree, jobs=args.jobs, progress=not args.quiet, force=args.force)
    print(f"kvgen build: {result['built']} built, {result['skipped']} unchanged -> {tree}")
    return 0


def cmd_prune(args) -> int:
    from .build.tree import prune

    if args.out and not args.spec:  # pruning a user's tree against kvgen's own spec would empty it
        raise UsageError("prune --out DIR needs the --spec FILE that tree was built from")
    tree = _tree(args)
    return _report("prune", prune(_spec(args).configs, tree), "removed")


def _report(command: str, paths: list, what: str) -> int:
    print(f"kvgen {command}: {len(paths)} file(s) {what}")
    for path in paths:
        print(f"  {path}")
    return 0


def cmd_list(args) -> int:
    from .runtime.loader import registry

    _check_arch(args)
    entries = [e for e in registry().entries if not args.arch or e.arch == args.arch]
    width = max([len("kernel")] + [len(e.name) for e in entries])
    arch = max([len("arch")] + [len(e.arch) for e in entries])
    print(f"{'kernel':<{width}} {'arch':<{arch}} {'block':>5} {'regs':>4} {'spill':>5} {'smem':>6}")
    for e in entries:
        print(f"{e.name:<{width}} {e.arch:<{arch}} {e.block[0]:>5} {e.registers:>4} {e.spill_bytes:>5} "
              f"{e.smem_bytes:>6}")
    print(f"{len(entries)} kernel(s)")
    return 0


def cmd_demo(args) -> int:
    import torch

    import kvgen
    from .families.dequant_gather.oracle import dequantize_and_gather_oracle
    from .testing import make_case, mismatches

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    case = make_case(seq_lens=[300, 77, 1024], gather_lens=[300, 40, 512], block_size=64, offset=5, seed=1)
    # Two independent paths: the op (cubin on a GPU, else whichever backend serves
    # CPU tensors) against kvgen/oracle.py, a decoder that shares no code with any
    # backend, run on the CPU copies.
    expected = case.out.clone()
    dequantize_and_gather_oracle(*case.args(out=expected))
    out = case.out.to(device)
    kvgen.dequantize_and_gather_k_cache(*case.args(device, out=out))
    if device == "cuda":
        torch.cuda.synchronize()
    bad = mismatches(out.cpu(), expected)
    cmd_list(argparse.Namespace(arch=None))  # after the call: a mistake in the environment is one line, first
    print(f"demo on {name}: backend={kvgen.last_backend()}, {out.shape[0]} requests, "
          f"{int(case.gather_lens.sum())} tokens gathered: "
          f"{'bit-exact against' if bad == 0 else f'{bad} values MISMATCH'} the independent decoder "
          "(kvgen.families.dequant_gather.oracle, integer bit arithmetic on the CPU)")
    return 0 if bad == 0 else 1


def cmd_bench(args) -> int:
    import json
    from pathlib import Path

    if args.report:
        try:
            report = json.loads(Path(args.report).read_text())
        except FileNotFoundError:
            raise UsageError(f"--report {args.report}: no such file (expected a JSON report written by "
                             "`python -m kvgen bench`, e.g. benchmarks/results/*.json)") from None
        except (OSError, ValueError) as err:
            raise UsageError(f"--report {args.report}: not a JSON report written by `python -m kvgen bench` "
                             f"({err})") from None
        if not isinstance(report, dict) or not isinstance(report.get("shapes"), list):
            raise UsageError(f"--report {args.report}: not a JSON report written by `python -m kvgen bench` "
                             "(no \"shapes\" list)")
    from .tools import bench

    if not args.report:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("bench needs a CUDA device (or --report FILE to render a saved report)")
        shapes = [s for s in bench.FAMILIES[args.family] if not args.shape or s.label in args.shape]
        report = bench.run(Path(args.out), shapes, sweep=args.sweep, family=args.family,
                           grid_targets=args.targets or bench.GRID_TARGETS)
    print(bench.markdown(report))
    if args.plot:
        bench.plot(report, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


def cmd_tune(args) -> int:
    from pathlib import Path

    import torch

    from .tools import tune

    if not torch.cuda.is_available():
        raise UsageError("tune needs a CUDA device")
    tune.tune(args.family, Path(args.out) if args.out else None, args.margin)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .tools.tune import MARGIN  # tune imports no torch at module level

    parser = _Parser(prog="python -m kvgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    def tree_arguments(p, verb):
        p.add_argument("--spec", help="the spec file (TOML) to work from (default: kvgen's shipped spec, "
                                      "kvgen/specs/shipped.toml)")
        p.add_argument("--out", help=f"the kernel tree to {verb} (default: the shipped tree; required with --spec)")

    p = add("generate", cmd_generate, "Render the spec's configs into <tree>/kvgen_kernels/ (deterministic).")
    tree_arguments(p, "write")
    p.add_argument("--kernel", action="append", help="only this kernel name (repeatable); others are kept")
    p.add_argument("--arch", help="only kernels for this arch (e.g. sm_90a)")
    p = add("build", cmd_build, "Render, compile and link the spec's configs into cubins and <tree>/manifest.json "
                                "(no GPU needed).")
    tree_arguments(p, "write")
    p.add_argument("--kernel", action="append", help="only (re)build this kernel (repeatable); the rest are kept")
    p.add_argument("--arch", help="only kernels for this arch (e.g. sm_90a)")
    p.add_argument("--jobs", type=_positive_int, default=None, help="parallel build processes (default: cores)")
    p.add_argument("--force", action="store_true", help="rebuild even where inputs are unchanged")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = add("prune", cmd_prune, "Remove the generated sources, cubins and manifest rows of a tree that its spec "
                                "no longer asks for.")
    tree_arguments(p, "prune")
    p = add("list", cmd_list, "List the kernels of the loaded trees (the shipped one, KVGEN_KERNEL_DIRS).")
    p.add_argument("--arch", help="only kernels for this arch")
    p = add("bench", cmd_bench, "Benchmark every backend on the issue's shapes (GPU), or render a saved report.")
    p.add_argument("--out", default="benchmarks/results", help="folder for <device>.json")
    p.add_argument("--shape", action="append", help="only this shape label (repeatable)")
    p.add_argument("--family", default="dsv4", choices=["dsv4", "v41", "sparse", "writer"],
                   help="which shapes: DSv4 dense (the speed issue's), V4.1 dense on the same, sparse, or the writer")
    p.add_argument("--sweep", action="store_true", help="also time every shipped variant for each shape")
    p.add_argument("--targets", type=int, nargs="+", help="with --sweep: the grid sizes (CTAs) to try")
    p.add_argument("--report", help="render this saved JSON report instead of measuring")
    p.add_argument("--plot", help="write a PNG plot here")
    p = add("tune", cmd_tune, "Time every shipped variant on the benchmark shapes (GPU) and write the winners "
                              "per shape class as dispatch rules (generated/dispatch.json).")
    p.add_argument("--family", nargs="+", default=list(TUNE_FAMILIES), choices=TUNE_FAMILIES)
    p.add_argument("--margin", type=float, default=MARGIN,
                   help=f"a variant must beat the default by more than this fraction (default {MARGIN})")
    p.add_argument("--out", help="write the table here instead of generated/dispatch.json")
    add("demo", cmd_demo, "Check one gather on this machine's device against the independent decoder, and list "
                          "the kernels.")
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # names the commands when none is given

    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except UsageError as err:  # only the user's mistakes: a bug keeps its traceback
        print(f"kvgen: error: {err}", file=sys.stderr)
        return 2
