"""The flags every command shares: the same selection and compute flags everywhere, each rule on a flag value
checked once (in the options class) and reported the same way by the library and the CLI (exit 2, one line
naming the flag)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fixtures import checkpoints as fx
from spectra_cli import options as core
from spectra_cli.cli import options as o
from spectra_cli.cli.app import app
from spectra_cli.errors import SpectraError

runner = CliRunner()

#: every command that decomposes a matrix (or runs a model): each takes all four compute flags
DECOMPOSING = ("analyze", "compare", "rankme", "allocate", "init-adapter", "capture", "merge", "check", "track")
COMPUTE_FLAGS = ("--device", "--backend", "--precision", "--max-memory")
#: the commands that read a checkpoint's matrices take the selection flags
SELECTING = ("analyze", "compare", "allocate", "init-adapter", "capture", "merge", "check", "track")
SELECTION_FLAGS = ("--include", "--exclude", "--kinds", "--roles", "--min-dim")


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "220"})


def error_lines(stderr: str) -> list[str]:
    """The text inside the usage-error box (typer draws it with rich), or spectra's own one-line ``Error: …``
    (a bad choice)."""
    inside, out = False, []
    for line in stderr.splitlines():
        if line.startswith("Error: "):
            out.append(line.removeprefix("Error: "))
        elif line.startswith("╭─ Error"):
            inside = True
        elif line.startswith("╰"):
            inside = False
        elif inside:
            out.append(line.strip("│ ").strip())
    return out


def help_flags(command: str) -> set[str]:
    r = invoke(command, "--help")
    assert r.exit_code == 0, r.output
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", r.stdout))


@pytest.mark.parametrize("command", DECOMPOSING)
@pytest.mark.parametrize("flag", COMPUTE_FLAGS)
def test_every_decomposing_command_takes_the_compute_flags(command: str, flag: str) -> None:
    assert flag in help_flags(command)


@pytest.mark.parametrize("command", SELECTING)
@pytest.mark.parametrize("flag", SELECTION_FLAGS)
def test_every_command_that_reads_matrices_takes_the_selection_flags(command: str, flag: str) -> None:
    assert flag in help_flags(command)


def test_method_is_the_values_method_only_where_there_is_one() -> None:
    """``--method`` is svd/gram for analyze and allocate; merge and init-adapter have their own --method."""
    for command in ("analyze", "allocate"):
        assert "auto|svd|gram" in invoke(command, "--help").stdout
    for command in ("compare", "rankme", "capture", "check", "merge", "init-adapter"):
        assert "auto|svd|gram" not in invoke(command, "--help").stdout, command


@pytest.mark.parametrize(
    ("command", "flag", "note"),
    [
        ("merge", "--device", "biases and norms are merged on the CPU"),
        ("merge", "--backend", "biases and norms are merged on the CPU"),
        ("merge", "--max-memory", "is refused before anything is written"),
        ("capture", "--backend", "The model always runs in PyTorch"),
        ("capture", "--precision", "No effect yet for capture"),
        ("capture", "--max-memory", "Not used yet by capture's statistics"),
        ("init-adapter", "--backend", "exact SVDs and QRs always run in PyTorch"),
        ("init-adapter", "--max-memory", "is refused before anything is written"),
        ("rankme", "--precision", "No effect yet for rankme"),
    ],
)
def test_a_flag_without_effect_says_so_in_its_help(command: str, flag: str, note: str) -> None:
    text = re.sub(r"[│\s]+", " ", invoke(command, "--help").stdout)
    assert note in text[text.index(flag):][:400], (command, flag)


def test_the_cli_choices_are_the_options_choices() -> None:
    """The typer choices are the types of the flags; the options classes hold the rules: they must agree."""
    from spectra_cli.cli.allocate import AlphaPolicy, StrategyName
    from spectra_cli.cli.capture import Stats
    from spectra_cli.flows.allocate import ALPHA_POLICIES
    from spectra_cli.flows.capture import STATS
    from spectra_cli.spectral.allocation import STRATEGIES

    assert tuple(p.value for p in o.Precision) == core.PRECISIONS
    assert tuple(b.value for b in o.Backend) == core.BACKENDS
    assert tuple(m.value for m in o.Method) == core.METHODS
    assert tuple(p.value for p in AlphaPolicy) == ALPHA_POLICIES
    assert tuple(s.value for s in Stats) == STATS
    assert tuple(s.value for s in StrategyName) == tuple(STRATEGIES)


# ---- a bad value: exit 2, one line naming the flag ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> fx.Generated:
    return fx.single_safetensors(tmp_path_factory.mktemp("tiny"))


def _cmd(command: str, ckpt: Path, out: Path) -> list[str | Path]:
    """The smallest command line that gets as far as building the options."""
    return {
        "analyze": ["analyze", ckpt],
        "compare": ["compare", ckpt, ckpt],
        "rankme": ["rankme", out / "e.npy"],
        "allocate": ["allocate", ckpt, "--budget-rank", "2"],
        "init-adapter": ["init-adapter", ckpt, "--rank", "2", "--out", out / "init"],
        "capture": ["capture", ckpt.parent, "--data", out / "d.txt", "--out", out / "a.safetensors"],
        "merge": ["merge", ckpt, f"a={ckpt}", f"b={ckpt}", "--out", out / "m"],
        "check": ["check", ckpt],
        "track": ["track", ckpt],
    }[command]


BAD_SHARED = [
    (["--max-memory", "0"], "--max-memory 0: the memory budget must be positive"),
    (["--max-memory", "lots"], "'lots' is not a size"),
    (["--precision", "float16"], "--precision"),
    (["--backend", "jax"], "--backend"),
]


@pytest.mark.parametrize("command", DECOMPOSING)
@pytest.mark.parametrize(("args", "message"), BAD_SHARED, ids=["max-memory-0", "max-memory-text", "precision", "backend"])
def test_a_bad_shared_flag_value_exits_2_with_one_line(tiny: fx.Generated, tmp_path: Path, command: str,
                                                       args: list[str], message: str) -> None:  # fmt: skip
    r = invoke(*_cmd(command, tiny.path, tmp_path), *args)
    assert r.exit_code == 2, r.output
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("command", SELECTING)
def test_a_bad_min_dim_exits_2_naming_the_flag(tiny: fx.Generated, tmp_path: Path, command: str) -> None:
    r = invoke(*_cmd(command, tiny.path, tmp_path), "--min-dim", "0")
    assert r.exit_code == 2 and error_lines(r.stderr) == ["Invalid value: --min-dim 0: must be at least 1"], r.stderr


@pytest.mark.parametrize("command", SELECTING)
def test_an_unknown_role_exits_2_listing_the_roles(tiny: fx.Generated, tmp_path: Path, command: str) -> None:
    r = invoke(*_cmd(command, tiny.path, tmp_path), "--roles", "mlp,ffn")
    assert r.exit_code == 2, r.output
    assert error_lines(r.stderr) == ["Invalid value: --roles ffn: not a role; choose from embedding, lm_head, "
                                     "attention, mlp, conv, other"], r.stderr  # fmt: skip
    assert not any(tmp_path.iterdir())


# ---- one rule, one place: the options class and the CLI give the same message ----------------------------


def _opts(module: str, cls: str) -> Callable[..., Any]:
    import importlib

    return getattr(importlib.import_module(f"spectra_cli.flows.{module}"), cls)  # type: ignore[no-any-return]


#: (options class, its keyword arguments, the command line that sets the same values)
RULES: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("compare", "CompareOptions", {"epsilons": (2.0,)}, ["compare", "{ckpt}", "{ckpt}", "--epsilon", "2"]),
    ("compare", "CompareOptions", {"epsilons": (0.5, 0.0)}, ["compare", "{ckpt}", "{ckpt}", "-e", "0.5,0"]),
    ("compare", "CompareOptions", {"top_k": 0}, ["compare", "{ckpt}", "{ckpt}", "--top-k", "0"]),
    ("rankme", "RankmeOptions", {"batch_size": 0}, ["rankme", "x.npy", "--batch-size", "0"]),
    ("rankme", "RankmeOptions", {"chunk_rows": 0}, ["rankme", "x.npy", "--chunk-rows", "0"]),
    ("init_adapter", "InitOptions", {"rank": 2, "dtype": "int8"},
     ["init-adapter", "{ckpt}", "--out", "{out}/i", "--rank", "2", "--dtype", "int8"]),
    ("init_adapter", "InitOptions", {"method": "nope"}, ["init-adapter", "{ckpt}", "--out", "{out}/i", "--method", "nope"]),
    ("init_adapter", "InitOptions", {"rank": 2, "allocate": "energy", "budget_rank": 2.0},
     ["init-adapter", "{ckpt}", "--out", "{out}/i", "--rank", "2", "--allocate", "energy", "--budget-rank", "2"]),
    ("init_adapter", "InitOptions", {"allocate": "energy"}, ["init-adapter", "{ckpt}", "--out", "{out}/i", "--allocate", "energy"]),
    ("merge", "MergeOptions", {"method": "rmm", "energy": 1.5},
     ["merge", "{ckpt}", "a={ckpt}", "b={ckpt}", "--out", "{out}/m", "--method", "rmm", "--energy", "1.5"]),
    ("merge", "MergeOptions", {"method": "tsv", "basis": 2},
     ["merge", "{ckpt}", "a={ckpt}", "b={ckpt}", "--out", "{out}/m", "--method", "tsv", "--basis", "2"]),
    ("merge", "MergeOptions", {"method": "nope"}, ["merge", "{ckpt}", "a={ckpt}", "b={ckpt}", "--out", "{out}/m", "--method", "nope"]),
    ("merge", "MergeOptions", {"interference_k": 0},
     ["merge", "{ckpt}", "a={ckpt}", "b={ckpt}", "--out", "{out}/m", "--interference-k", "0"]),
    ("allocate", "AllocateOptions", {}, ["allocate", "{ckpt}"]),
    ("allocate", "AllocateOptions", {"budget_rank": 2.0, "budget_params": 100},
     ["allocate", "{ckpt}", "-r", "2", "--budget-params", "100"]),
    ("allocate", "AllocateOptions", {"budget_rank": -1.0}, ["allocate", "{ckpt}", "--budget-rank", "-1"]),
    ("allocate", "AllocateOptions", {"budget_params": 0}, ["allocate", "{ckpt}", "--budget-params", "0"]),
    ("allocate", "AllocateOptions", {"budget_rank": 2.0, "strategy": "eva"}, ["allocate", "{ckpt}", "-r", "2", "-s", "eva"]),
    ("allocate", "AllocateOptions", {"budget_rank": 2.0, "rho": 0.5}, ["allocate", "{ckpt}", "-r", "2", "--rho", "0.5"]),
    ("allocate", "AllocateOptions", {"budget_rank": 2.0, "multiple_of": 0}, ["allocate", "{ckpt}", "-r", "2", "--multiple-of", "0"]),
    ("allocate", "AllocateOptions", {"budget_rank": 2.0, "min_rank": 4, "max_rank": 2},
     ["allocate", "{ckpt}", "-r", "2", "--min-rank", "4", "--max-rank", "2"]),
    ("capture", "CaptureOptions", {"tau": 1.5},
     ["capture", "{out}", "--data", "{out}/d.txt", "--out", "{out}/a.safetensors", "--tau", "1.5"]),
    ("capture", "CaptureOptions", {"components": 0},
     ["capture", "{out}", "--data", "{out}/d.txt", "--out", "{out}/a.safetensors", "--components", "0"]),
    ("analyze", "AnalyzeOptions", {"max_memory": 0}, ["analyze", "{ckpt}", "--max-memory", "0"]),
    ("check", "CheckOptions", {"min_dim": 0}, ["check", "{ckpt}", "--min-dim", "0"]),
]


@pytest.mark.parametrize(("module", "cls", "kwargs", "argv"), RULES,
                         ids=[f"{r[1]}-{'-'.join(r[2]) or 'defaults'}" for r in RULES])  # fmt: skip
def test_a_rule_is_checked_once_and_reads_the_same_everywhere(tiny: fx.Generated, tmp_path: Path, module: str,
                                                              cls: str, kwargs: dict[str, Any], argv: list[str]
                                                              ) -> None:  # fmt: skip
    with pytest.raises(SpectraError) as e:
        _opts(module, cls)(**kwargs)
    message = str(e.value)
    assert message.startswith("-") or "--" in message, message  # it names the flag
    r = invoke(*(a.format(ckpt=tiny.path, out=tmp_path) for a in argv))
    assert r.exit_code == 2, r.output
    assert error_lines(r.stderr) == [f"Invalid value: {message}"], r.stderr


def test_build_turns_an_options_error_into_a_usage_error() -> None:
    import typer

    with pytest.raises(typer.BadParameter, match=r"^--epsilon 2: every epsilon must be in \(0, 1\]$"):
        o.build(_opts("compare", "CompareOptions"), o.selection(None, None, None), epsilons=(2.0,))
    built = o.build(_opts("analyze", "AnalyzeOptions"), o.selection(["a*", "b*,c*"], None, ["q_proj"], 4, True),
                    o.engine("cpu", o.Precision.float64, o.Backend.numpy, 1 << 20, o.Method.svd))  # fmt: skip
    assert (built.include, built.kinds, built.min_dim, built.split_fused) == (("a*", "b*", "c*"), ("q_proj",), 4, True)
    assert (built.device, built.precision, built.backend, built.max_memory, built.method) == (
        "cpu", "float64", "numpy", 1 << 20, "svd")  # fmt: skip


# ---- a real run takes the shared flags and records them ----------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny: fx.Generated) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shared")
    name = "layers.0.mlp.up_proj.weight"
    w = tiny.matrices[name]
    rng = np.random.default_rng(0)
    a = fx.patched_copy(tiny.path, root / "a", {name: w + 0.05 * rng.standard_normal(w.shape)}).path
    b = fx.patched_copy(tiny.path, root / "b", {name: w + 0.05 * rng.standard_normal(w.shape)}).path
    np.save(root / "emb.npy", rng.standard_normal((40, 6)).astype(np.float32))
    (root / "policy.toml").write_text("[rules]\nno_nonfinite = true\n", encoding="utf-8")
    return {"base": tiny.path, "a": a, "b": b, "emb": root / "emb.npy", "policy": root / "policy.toml"}


RUNS: dict[str, list[str]] = {
    "analyze": ["analyze", "{base}"],
    "compare": ["compare", "{base}", "{a}"],
    "rankme": ["rankme", "{emb}"],
    "allocate": ["allocate", "{base}", "--budget-rank", "2"],
    "merge": ["merge", "{base}", "a={a}", "b={b}", "--out", "{out}/merged"],
    "check": ["check", "{base}", "--policy", "{policy}"],
    "init-adapter": ["init-adapter", "{base}", "--rank", "2", "--out", "{out}/init"],
}


@pytest.mark.parametrize("command", list(RUNS))
def test_a_run_takes_the_shared_flags_and_records_them(inputs: dict[str, Path], tmp_path: Path, command: str) -> None:
    if command == "init-adapter":
        pytest.importorskip("torch")
    argv = [a.format(out=tmp_path, **inputs) for a in RUNS[command]]
    shared = ["--device", "cpu", "--backend", "numpy", "--precision", "float64", "--max-memory", "64MB"]
    if command != "rankme":
        shared += ["--kinds", "up_proj,down_proj", "--roles", "mlp", "--min-dim", "2"]
    r = invoke(*argv, *shared, "-f", "json", "-q")
    assert r.exit_code == 0, r.output
    options = json.loads(r.stdout)["options"]
    if command == "check":  # check records the selection and the precision of its verdicts only
        assert options["precision"] == "float64"
    else:
        assert (options["device"], options["backend"], options["precision"], options["max_memory"]) == (
            "cpu", "numpy", "float64", 64 * 2**20)  # fmt: skip
    if command != "rankme":
        assert list(options["kinds"]) == ["up_proj", "down_proj"] and options["min_dim"] == 2
        assert list(options["roles"]) == ["mlp"]
