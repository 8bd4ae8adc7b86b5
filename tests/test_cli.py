"""The CLI and the installed package, on the CPU: user mistakes are one line
with exit status 2, `--help` and argument errors import no torch, bench
leaves the environment alone, and an installed wheel can generate and build."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvgen.build.tree import shipped_configs

REPO = Path(__file__).resolve().parents[1]
INSTALL_HINT = "pip install 'kvgen[build]'"


def _env(**extra) -> dict:
    """The test's environment without the caller's KVGEN_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVGEN_")}
    env.update(extra)
    return env


def _run(args, *, cwd=REPO, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def _split_importtime(stderr: str) -> tuple[list[str], set[str]]:
    """(the other stderr lines, the top-level modules imported) of a `python -X importtime` run."""
    lines, modules = [], set()
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.rsplit("|", 1)[-1].strip().split(".")[0])
        elif line.strip():
            lines.append(line)
    return lines, modules


def _assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and lines[0].startswith("kvgen: error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------ help and argument errors
# --jobs 0 comes with an unknown --kernel: were it accepted, the command would
# stop at the kernel name rather than start a build.
ARG_ERRORS = {
    "no command": ([], "required: {generate,build,prune,list,bench,tune,demo}"),
    "jobs 0": (["build", "--jobs", "0", "--kernel", "nope"], "argument --jobs: expected an integer >= 1, got 0"),
    "jobs negative": (["build", "--jobs", "-2", "--kernel", "nope"], "argument --jobs: expected an integer >= 1"),
    "unknown command": (["frob"], "invalid choice: 'frob'"),
}


def test_help_answers_without_importing_torch():
    for argv in (["--help"], ["build", "--help"], ["prune", "--help"]):
        done = _run(["-X", "importtime", "-m", "kvgen", *argv])
        other, modules = _split_importtime(done.stderr)
        assert done.returncode == 0 and "usage: python -m kvgen" in done.stdout and not other, (argv, done.stderr)
        assert "kvgen" in modules and "torch" not in modules, argv


@pytest.mark.parametrize("case", sorted(ARG_ERRORS))
def test_argument_errors_are_one_line_without_torch(case):
    argv, needle = ARG_ERRORS[case]
    done = _run(["-X", "importtime", "-m", "kvgen", *argv])
    other, modules = _split_importtime(done.stderr)
    _assert_one_line_error(subprocess.CompletedProcess(done.args, done.returncode, done.stdout, "\n".join(other)),
                           needle)
    assert "torch" not in modules


# ------------------------------------------------------------- user mistakes
def test_user_mistakes_are_one_line_with_status_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing.json"
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    not_a_report = tmp_path / "list.json"
    not_a_report.write_text("[1, 2]")
    mistakes = [
        (["bench", "--report", str(missing)], {}, (str(missing), "no such file")),
        (["bench", "--report", str(broken)], {}, (str(broken), "not a JSON report")),
        (["bench", "--report", str(not_a_report)], {}, (str(not_a_report), "no \"shapes\" list")),
        (["list"], {"KVGEN_GENERATED_DIR": str(empty)}, ("manifest not found", f"KVGEN_GENERATED_DIR={empty}")),
        (["demo"], {"KVGEN_BACKEND": "cuda"}, ("KVGEN_BACKEND='cuda'", "cubin, ptx, triton, torch")),
    ]
    for argv, env, needles in mistakes:
        done = _run(["-m", "kvgen", *argv], env=_env(**env))
        _assert_one_line_error(done, *needles)
        assert done.stdout == "", (argv, done.stdout[:200])  # the error, and nothing before it


def test_api_raises_value_errors_for_bad_environment(monkeypatch):
    from kvgen.runtime import dispatch
    from kvgen.errors import UsageError
    from kvgen.runtime.manifest import ManifestError, read_manifest

    monkeypatch.setenv("KVGEN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="expected one of cubin, ptx, triton, torch"):
        dispatch.forced_backend()
    monkeypatch.setenv("KVGEN_PDL", "2")
    with pytest.raises(UsageError, match="expected 1 or 0"):
        dispatch.pdl_requested()
    assert issubclass(ManifestError, ValueError)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(Path("/nonexistent/manifest.json"))


@pytest.mark.parametrize("argv", [["generate"], ["build", "--quiet"]])
def test_generate_and_build_without_the_build_extras_say_what_to_install(argv, tmp_path):
    # The build extras hidden: `import jinja2` fails, find_spec says None.
    script = ("import runpy, sys\n"
              "sys.modules.update(dict.fromkeys(['jinja2', 'cutlass', 'cuda.core', 'tqdm']))\n"
              "sys.argv = ['kvgen', *sys.argv[1:]]\n"
              "runpy.run_module('kvgen', run_name='__main__', alter_sys=True)\n")
    done = _run(["-c", script, *argv], env=_env(KVGEN_GENERATED_DIR=str(tmp_path)))
    _assert_one_line_error(done, INSTALL_HINT, "jinja2")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- commands
def test_list_sizes_the_name_column_to_the_longest_name(capsys):
    from kvgen import cli
    from kvgen.runtime.loader import registry

    assert cli.main(["list"]) == 0
    header, *rows, total = capsys.readouterr().out.splitlines()
    names = [e.name for e in registry().entries]
    assert max(map(len, names)) > 52  # the old fixed width
    column = header.index("arch")
    assert len(rows) == len(names)
    for row, name in zip(rows, names):
        assert row.startswith(name + " ") and row[column:].startswith(("sm_", "compute_")), row


def test_generate_never_prunes_and_prune_is_its_own_command(monkeypatch, capsys):
    from kvgen import cli
    from kvgen.build import tree as build
    from kvgen.paths import generated_dir

    shipped = list(build.shipped_configs())
    calls = []
    monkeypatch.setattr(build, "generate", lambda *a, **k: calls.append(("generate", a, k)) or [])
    monkeypatch.setattr(build, "prune", lambda *a, **k: calls.append(("prune", a, k)) or
                        [Path("gen/kvgen_kernels/old.py"), Path("gen/cubins/sm_90a/old.cubin")], raising=False)
    assert cli.main(["generate"]) == 0
    assert cli.main(["generate", "--kernel", shipped[0].name]) == 0
    assert cli.main(["prune"]) == 0
    assert calls == [("generate", (shipped, generated_dir()), {}),
                     ("generate", ([shipped[0]], generated_dir()), {}),
                     ("prune", (tuple(shipped), generated_dir()), {})]
    out = capsys.readouterr().out
    assert "kvgen prune: 2 file(s) removed" in out
    assert "gen/kvgen_kernels/old.py" in out and "gen/cubins/sm_90a/old.cubin" in out
    assert "prune:" in (REPO / "Makefile").read_text()


# ------------------------------------------------------------------- bench
def test_bench_runner_leaves_the_environment_as_it_found_it(monkeypatch):
    import kvgen
    from kvgen.tools import bench
    from kvgen.testing import make_case

    args = list(make_case(seq_lens=[20, 7], block_size=16, seed=0).args())
    monkeypatch.delenv("KVGEN_BACKEND", raising=False)
    monkeypatch.setenv("KVGEN_PDL", "0")
    bench._runner("torch", args)()
    assert kvgen.last_backend() == "torch"
    assert os.environ.get("KVGEN_PDL") == "0" and "KVGEN_BACKEND" not in os.environ
    monkeypatch.setenv("KVGEN_BACKEND", "torch")
    monkeypatch.delenv("KVGEN_PDL")
    bench._runner("torch", args, pdl_env="1")()
    assert os.environ.get("KVGEN_BACKEND") == "torch" and "KVGEN_PDL" not in os.environ


# ------------------------------------------------------------ installed wheel
SEED = next(c for c in shipped_configs() if c.name == "dqgk_dsv4_584_f448_b64_s4_w4_dense_g1_strided_p0_sm_90a")



@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The repo built into a wheel (~1 s: pure Python, no isolation, no network)
    and installed with `pip install --target`; returns the target folder."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for path in REPO.iterdir():  # a copy, so that the build writes nothing into the checkout
        if path.is_file():
            shutil.copy2(path, src / path.name)
    for folder in ("kvgen", "templates", "generated"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = _env(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    done = _run(["-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(root / "dist")],
                cwd=src, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = (root / "dist").glob("kvgen-*.whl")
    done = _run(["-m", "pip", "install", "-q", "--no-deps", "--target", str(root / "site"), str(wheel)],
                cwd=root, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    # A stray generated/ beside the installed package is somebody else's folder, not a checkout.
    (root / "site" / "generated").mkdir()
    return root / "site"


INSTALLED_CHECK = """
import hashlib, importlib.resources, json, sys
import kvgen, kvgen.paths
from kvgen.build.render import render_kernel
from kvgen.build.tree import shipped_configs

SEED = next(c for c in shipped_configs() if c.name == "dqgk_dsv4_584_f448_b64_s4_w4_dense_g1_strided_p0_sm_90a")

site = sys.argv[1]
assert kvgen.__file__.startswith(site), kvgen.__file__
seed = render_kernel(SEED)  # from the installed templates
assert str(kvgen.paths.generated_dir()).startswith(site + "/kvgen/"), kvgen.paths.generated_dir()
assert str(kvgen.paths.templates_dir()).startswith(site + "/kvgen/"), kvgen.paths.templates_dir()
data = importlib.resources.files("kvgen.generated")
manifest = json.loads((data / "manifest.json").read_text())
for row in manifest["kernels"]:
    assert hashlib.sha256((data / row["cubin"]).read_bytes()).hexdigest() == row["cubin_sha256"], row["name"]
json.loads((data / "dispatch.json").read_text())
print(json.dumps({"kernels": len(manifest["kernels"]), "seed": seed}))
"""


def test_installed_wheel_generates_and_ships_its_package_data(installed, tmp_path):
    from kvgen.build.render import render_kernel
    from kvgen.build.tree import shipped_configs

    env = _env(PYTHONPATH=str(installed))
    done = _run(["-c", INSTALLED_CHECK, str(installed)], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["seed"] == render_kernel(SEED)  # the installed templates are the checkout's
    assert result["kernels"] == len(json.loads((REPO / "generated" / "manifest.json").read_text())["kernels"])

    out = tmp_path / "generated"
    done = _run(["-m", "kvgen", "generate"], cwd=tmp_path, env=_env(PYTHONPATH=str(installed),
                                                                      KVGEN_GENERATED_DIR=str(out)))
    assert done.returncode == 0, done.stderr
    expected = {c.filename for c in shipped_configs()} | {"__init__.py", "ptx_helpers_hopper.py", "ptx_helpers_integer.py"}
    assert {p.name for p in (out / "kvgen_kernels").iterdir()} == expected

    done = _run(["-m", "kvgen", "list"], cwd=tmp_path, env=env)  # the package data's manifest
    assert done.returncode == 0 and f"{result['kernels']} kernel(s)" in done.stdout, done.stderr


def test_installed_console_script_answers_help_without_torch(installed, tmp_path):
    script = installed / "bin" / "kvgen"
    if not script.exists():
        pytest.skip("pip installed no console script")
    done = _run(["-X", "importtime", str(script), "--help"], cwd=tmp_path, env=_env(PYTHONPATH=str(installed)))
    other, modules = _split_importtime(done.stderr)
    assert done.returncode == 0 and "usage:" in done.stdout and not other, done.stderr
    assert "kvgen" in modules and "torch" not in modules


def test_installed_wheel_builds_a_kernel(installed, tmp_path):
    import importlib.util

    if importlib.util.find_spec("cutlass") is None:
        pytest.skip("the build extras (CuteDSL) are not installed")
    out = tmp_path / "generated"
    env = _env(PYTHONPATH=str(installed), KVGEN_GENERATED_DIR=str(out))
    done = _run(["-m", "kvgen", "build", "--kernel", SEED.name, "--quiet"], cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0 and "1 built" in done.stdout, done.stderr
    (row,) = [r for r in json.loads((out / "manifest.json").read_text())["kernels"] if r["name"] == SEED.name]
    cubin = (out / row["cubin"]).read_bytes()
    assert cubin[:4] == b"\x7fELF" and hashlib.sha256(cubin).hexdigest() == row["cubin_sha256"]

    # A user's spec, built into the user's folder by the installed kvgen, then served by it.
    mine = tmp_path / "my_kernels"
    env = _env(PYTHONPATH=str(installed))
    done = _run(["-m", "kvgen", "build", "--spec", str(REPO / "examples" / "fp8_384.toml"), "--out", str(mine),
                 "--kernel", "dqgk_fp8_384_f384_b64_s3_w4_dense_g1_strided_p1_sm_90a", "--quiet"],
                cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0 and "1 built" in done.stdout, done.stderr
    done = _run(["-m", "kvgen", "list"], cwd=tmp_path, env=_env(PYTHONPATH=str(installed), KVGEN_KERNEL_DIRS=str(mine)))
    assert done.returncode == 0 and "dqgk_fp8_384_f384_b64_s3_w4_dense_g1_strided_p1_sm_90a" in done.stdout
