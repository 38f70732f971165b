"""Every hostile input named in issue 12 (readers and silent wrong results), one table row each: what is
given, which command reads it, the exit code and what the one ``Error:`` line must say. Before the fix these
ended in a traceback (TypeError, OverflowError, RecursionError, ValueError), a hang (a FIFO), or a wrong answer
with exit 0."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.checkpoints import lora_adapter, lora_base, write_safetensors
from tests.hostile.helpers import (
    assert_process_refused,
    assert_refused,
    cli,
    deep_json,
    no_hang,
    run_module,
    safetensors_raw,
)

F32_4x4 = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
DATA = np.ones(32, dtype="<f4").tobytes()
NAME = "layers.0.mlp.up_proj.weight"


def _st(tmp: Path, header: Any = None, raw: bytes | None = None, data: bytes = DATA) -> list[Any]:
    path = tmp / "model.safetensors"
    path.write_bytes(safetensors_raw(header, data, raw))
    return ["analyze", path, "-f", "json"]


def _entry(**fields: Any) -> dict[str, Any]:
    return {NAME: {**F32_4x4, **fields}}


# ---- the safetensors header -------------------------------------------------------------------------------

SAFETENSORS: dict[str, tuple[Callable[[Path], list[Any]], tuple[str, ...]]] = {
    "dtype is a list": (lambda t: _st(t, _entry(dtype=["F32"])), ("dtype a list",)),
    "dtype is unknown": (lambda t: _st(t, _entry(dtype="Q7")), ("unknown dtype", "'Q7'")),
    "shape is Infinity": (
        lambda t: _st(
            t, raw=b'{"%s": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 64]}}' % NAME.encode()
        ),
        ("shape [Infinity]",),
    ),
    "offsets are Infinity": (
        lambda t: _st(
            t, raw=b'{"%s": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, Infinity]}}' % NAME.encode()
        ),
        ("data_offsets",),
    ),
    "shape is negative": (lambda t: _st(t, _entry(shape=[-4, -4])), ("shape [-4, -4]",)),
    "shape is a string": (lambda t: _st(t, _entry(shape="4x4")), ("shape a string",)),
    "shape holds floats": (lambda t: _st(t, _entry(shape=[4.0, 4.0])), ("shape",)),
    "shape holds booleans": (lambda t: _st(t, _entry(shape=[True, 16])), ("shape [true, 16]",)),
    "offsets are negative": (lambda t: _st(t, _entry(data_offsets=[-64, 0])), ("data_offsets [-64, 0]",)),
    "offsets are strings": (lambda t: _st(t, _entry(data_offsets=["0", "64"])), ("data_offsets",)),
    "offsets are three numbers": (lambda t: _st(t, _entry(data_offsets=[0, 64, 128])), ("data_offsets",)),
    "offsets run backwards": (lambda t: _st(t, _entry(data_offsets=[64, 0])), ("begin ≤ end",)),
    "size is not prod(shape)·itemsize": (
        lambda t: _st(t, _entry(data_offsets=[0, 100]), data=DATA * 2),
        ("64 bytes", "spans 100 bytes"),
    ),
    "offsets beyond the file": (lambda t: _st(t, _entry(data_offsets=[128, 192])), ("truncated",)),
    "overlapping tensors": (
        lambda t: _st(
            t,
            {**_entry(), "layers.1.mlp.up_proj.weight": {**F32_4x4, "data_offsets": [32, 96]}},
            data=DATA * 2,
        ),
        ("overlap",),
    ),
    "the same bytes for two tensors": (
        lambda t: _st(t, {**_entry(), "layers.1.mlp.up_proj.weight": F32_4x4}),
        ("overlap",),
    ),
    "a tensor named twice": (
        lambda t: _st(t, raw=(b'{"a": %s, "a": %s}' % ((json.dumps(F32_4x4).encode(),) * 2))),
        ("appears twice",),
    ),
    "header nested 100k deep": (lambda t: _st(t, raw=deep_json(100_000).encode()), ("levels deep",)),
    "header nested 100 deep": (lambda t: _st(t, {"x": json.loads(deep_json(100))}), ("levels deep",)),
    "header length absurd": (
        lambda t: [
            "analyze",
            _write(t / "m.safetensors", (2**63).to_bytes(8, "little") + b"{}"),
            "-f",
            "json",
        ],
        ("header length",),
    ),
    "header not an object": (lambda t: _st(t, [1, 2]), ("not a JSON object",)),
    "header not UTF-8": (lambda t: _st(t, raw=b'{"\xff": 1}'), ("UTF-8",)),
    "__metadata__ not a map of strings": (
        lambda t: _st(t, {"__metadata__": {"a": [1]}, **_entry()}),
        ("__metadata__",),
    ),
    "__metadata__ a list": (lambda t: _st(t, {"__metadata__": ["a"], **_entry()}), ("__metadata__",)),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(SAFETENSORS))
def test_safetensors_header(case: str, tmp_path: Path) -> None:
    build, fragments = SAFETENSORS[case]
    assert_refused(cli(*build(tmp_path)), 1, *fragments)


# ---- the sharded index, folders, symlinks and special files -------------------------------------------------


def _sharded(tmp: Path, shard_name: Any) -> Path:
    model = tmp / "model"
    write_safetensors(model / "model-00001.safetensors", {NAME: np.ones((4, 4), np.float32)})
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {NAME: shard_name}}))
    (tmp / "secret.safetensors").write_bytes(b"\0" * 98765)
    return model


INDEX: dict[str, tuple[Any, tuple[str, ...]]] = {
    "shard name is a number": (123, ("the number 123", "not a file name")),
    "shard name is a list": (["model-00001.safetensors"], ("a list",)),
    "shard name leaves the folder": ("../secret.safetensors", ("'../secret.safetensors'", "plain file name")),
    "shard name is absolute": ("/etc/passwd", ("'/etc/passwd'", "plain file name")),
    "shard name has a folder": ("sub/model-00001.safetensors", ("plain file name",)),
    "shard name is ..": ("..", ("not a file name",)),
    "shard name is empty": ("", ("not a file name",)),
}


@pytest.mark.parametrize("case", sorted(INDEX))
def test_index_shard_names_are_checked_before_any_file_is_opened(case: str, tmp_path: Path) -> None:
    shard, fragments = INDEX[case]
    line = assert_refused(cli("analyze", _sharded(tmp_path, shard), "-f", "json"), 1, *fragments)
    assert "98765" not in line  # the size of the file outside the folder never leaks


def test_a_shard_name_reaching_a_fifo_outside_is_refused_without_opening_it(tmp_path: Path) -> None:
    model = _sharded(tmp_path, "../pipe.safetensors")
    os.mkfifo(tmp_path / "pipe.safetensors")
    with no_hang():
        assert_refused(cli("analyze", model), 1, "plain file name")


@pytest.mark.parametrize("name", ["model.safetensors", "weights.safetensors", "pytorch_model.bin", "x.pt"])
def test_a_fifo_named_like_weights_is_refused_not_waited_on(name: str, tmp_path: Path) -> None:
    """Reading a FIFO blocks until a writer comes: before the fix `analyze` hung forever."""
    os.mkfifo(tmp_path / name)
    folder = tmp_path / "folder"
    folder.mkdir()
    os.mkfifo(folder / name)
    with no_hang():
        assert_refused(cli("analyze", tmp_path / name), 1, "FIFO")
        assert_refused(cli("analyze", folder), 1, "FIFO")


def test_a_fifo_is_refused_through_the_entry_point(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    assert_process_refused(run_module("analyze", tmp_path / "model.safetensors", timeout=60), 1, "FIFO")


def test_a_shard_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    os.mkfifo(model / "model-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {NAME: "model-00001.safetensors"}})
    )
    with no_hang():
        assert_refused(cli("analyze", model), 1, "FIFO")


def test_a_device_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").symlink_to("/dev/zero")
    assert_refused(cli("analyze", tmp_path / "model.safetensors"), 1, "character device")


def test_a_symlink_loop_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    assert_refused(cli("analyze", tmp_path / "loop.safetensors"), 1, "symlink loop")
    (tmp_path / "a.safetensors").symlink_to(tmp_path / "b.safetensors")
    (tmp_path / "b.safetensors").symlink_to(tmp_path / "a.safetensors")
    assert_refused(cli("analyze", tmp_path / "a.safetensors"), 1, "symlink loop")


def test_a_folder_linking_to_itself_is_one_error(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").symlink_to(model)  # the weights "file" is the folder itself
    assert_refused(cli("analyze", model), 1, "is a folder")
    other = tmp_path / "other"
    other.mkdir()
    (other / "self").symlink_to(other)
    (other / "w.safetensors").symlink_to(other / "self")
    assert_refused(cli("analyze", other), 1, "a folder")


# ---- config.json -------------------------------------------------------------------------------------------

CONFIG: dict[str, tuple[Any, tuple[str, ...]]] = {
    "num_attention_heads is text": ({"num_attention_heads": "x"}, ("'num_attention_heads'", "a string")),
    "hidden_size is 0": ({"hidden_size": 0}, ("'hidden_size'",)),
    "head_dim is a float": ({"head_dim": 2.5}, ("'head_dim'",)),
    "model_type is a number": ({"model_type": 3}, ("'model_type'",)),
    "config is a list": ([1], ("JSON object",)),
    "config nested 100k deep": (None, ("levels deep",)),
}


@pytest.mark.parametrize("case", sorted(CONFIG))
def test_config_json(case: str, tmp_path: Path) -> None:
    config, fragments = CONFIG[case]
    write_safetensors(tmp_path / "model.safetensors", {NAME: np.ones((4, 4), np.float32)})
    text = json.dumps(config) if config is not None else deep_json(100_000)
    (tmp_path / "config.json").write_text(text)
    assert_refused(cli("analyze", tmp_path, "--split-fused"), 1, "config.json", *fragments)


# ---- adapter_config.json -------------------------------------------------------------------------------------

MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lora_base(tmp_path_factory.mktemp("base")).path


ADAPTER: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    'r: "four"': ({"r": "four"}, ("'r'", "a string")),
    "r: 0": ({"r": 0}, ("'r'", "≥ 1")),
    "r: -2": ({"r": -2}, ("'r'",)),
    "r: 2.5": ({"r": 2.5}, ("'r'",)),
    "r: true": ({"r": True}, ("'r'", "true")),
    'lora_alpha: "x"': ({"lora_alpha": "x"}, ("'lora_alpha'",)),
    "lora_alpha: NaN": ({"lora_alpha": float("nan")}, ("'lora_alpha'", "NaN")),
    "rank_pattern is a list": ({"rank_pattern": ["q_proj", 2]}, ("'rank_pattern'", "a list")),
    "rank_pattern key is an invalid regex": ({"rank_pattern": {"q_proj(": 2}}, ("regular expression",)),
    "rank_pattern value is text": ({"rank_pattern": {"q_proj": "2"}}, ("'rank_pattern'",)),
    "rank_pattern value is 0": ({"rank_pattern": {"q_proj": 0}}, ("'rank_pattern'",)),
    "alpha_pattern value is a list": ({"alpha_pattern": {"q_proj": [1]}}, ("'alpha_pattern'",)),
    "target_modules is a number": ({"target_modules": 3}, ("'target_modules'",)),
    "target_modules is an invalid regex": ({"target_modules": "q_proj["}, ("regular expression",)),
    'use_dora: "yes"': ({"use_dora": "yes"}, ("'use_dora'",)),
    "peft_type is a list": ({"peft_type": ["LORA"]}, ("'peft_type'",)),
}


@pytest.mark.parametrize("case", sorted(ADAPTER))
def test_adapter_config(case: str, base: Path, tmp_path: Path) -> None:
    fields, fragments = ADAPTER[case]
    rng = np.random.default_rng(0)
    adapter = lora_adapter(tmp_path / "adapter", {MODULE: (rng.standard_normal((2, 16)), rng.standard_normal((16, 2)))},
                           r=2, alpha=4.0)  # fmt: skip
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    assert_refused(cli("compare", base, adapter, "-f", "json"), 1, "adapter_config.json", *fragments)


def test_a_ranks_file_of_the_wrong_types_is_one_error(base: Path, tmp_path: Path) -> None:
    ranks = tmp_path / "ranks.json"
    ranks.write_text(json.dumps({"r": "four", "lora_alpha": 8}))
    r = cli("init-adapter", base, "--ranks", ranks, "--out", tmp_path / "out")
    assert_refused(r, 1, "ranks.json", "'r'")


# ---- saved spectra, bundles, report JSON, policies, baselines ------------------------------------------------


@pytest.fixture(scope="module")
def spectra(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("spectra")
    ckpt = write_safetensors(root / "m.safetensors", {NAME: np.eye(6, 4, dtype=np.float32)})
    out = root / "m.spectra.safetensors"
    assert cli("analyze", ckpt, "--save-spectra", out, "-q", "-f", "json").exit_code == 0
    from spectra_cli.checkpoint.safetensors_io import read_header

    return out, read_header(out)[1]


SPECTRA: dict[str, tuple[Callable[[list[dict[str, Any]]], Any], tuple[str, ...]]] = {
    "a record without its shape": (lambda m: [{k: v for k, v in m[0].items() if k != "shape"}], ("'shape' is missing",)),
    "a shape of strings": (lambda m: [{**m[0], "shape": ["6", "4"]}], ("'shape'",)),
    "a depth that is text": (lambda m: [{**m[0], "depth": "0"}], ("'depth'",)),
    "a record that is a string": (lambda m: ["x"], ("matrix record #1",)),
    "matrices an object": (lambda m: {"a": m}, ("must be a list",)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(SPECTRA))
def test_saved_spectra(case: str, spectra: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    from fixtures.checkpoints import read_tensor

    path, meta = spectra
    mutate, fragments = SPECTRA[case]
    new_meta = {**meta, "matrices": json.dumps(mutate(json.loads(meta["matrices"])))}
    target = write_safetensors(tmp_path / "s.safetensors", {NAME: read_tensor(path, NAME)}, new_meta)
    assert_refused(cli("analyze", target), 1, "s.safetensors", *fragments)


def test_saved_spectra_whose_matrices_record_is_not_json(
    spectra: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    from fixtures.checkpoints import read_tensor

    path, meta = spectra
    target = write_safetensors(
        tmp_path / "s.safetensors", {NAME: read_tensor(path, NAME)}, {**meta, "matrices": "[{"}
    )
    assert_refused(cli("analyze", target), 1, "'matrices' record", "not valid JSON")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.merge_cases import full_case

    root = tmp_path_factory.mktemp("bundle")
    case = full_case(root / "case", n=2)
    out = root / "bundle"
    r = cli("merge", case.base_path, *(f"{k}={v}" for k, v in case.paths.items()), "--method", "rmm",
            "--out", out, "--kinds", "q_proj", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    return out


BUNDLE: dict[str, tuple[Callable[[dict[str, Any]], Any], tuple[str, ...]]] = {
    "no modules": (lambda d: {k: v for k, v in d.items() if k != "modules"}, ("'modules' is missing",)),
    "coefficients of the wrong shape": (
        lambda d: {**d, "modules": {k: {**m, "coefficients": [[1.0, 2.0]]} for k, m in d["modules"].items()}},
        ("'coefficients'", "2×1"),
    ),
    "a basis size its coefficients do not have": (
        lambda d: {**d, "modules": {k: {**m, "p": m["p"] + 1} for k, m in d["modules"].items()}},
        ("'coefficients'",),
    ),
    "tasks an object": (lambda d: {**d, "tasks": {"t0": {}}}, ("'tasks'", "an object")),
    "a task without a name": (lambda d: {**d, "tasks": [{"kind": "full"}, *d["tasks"][1:]]}, ("'name' is missing",)),
    "errors of text": (
        lambda d: {**d, "modules": {k: {**m, "errors": ["0", "0"]} for k, m in d["modules"].items()}},
        ("'errors'",),
    ),
    "version true": (lambda d: {**d, "version": True}, ("version",)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BUNDLE))
def test_rmm_bundle(case: str, bundle: Path, tmp_path: Path) -> None:
    import shutil

    mutate, fragments = BUNDLE[case]
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    doc = json.loads((copy / "coefficients.json").read_text())
    (copy / "coefficients.json").write_text(json.dumps(mutate(doc)))
    assert_refused(cli("reconstruct", copy, "--task", "t0", "--out", tmp_path / "out"), 1, "coefficients.json",
                   *fragments)  # fmt: skip


def _golden(name: str) -> dict[str, Any]:
    return json.loads((Path(__file__).resolve().parents[1] / "golden" / f"{name}.json").read_text())


REPORT: dict[str, tuple[Callable[[], str], tuple[str, ...]]] = {
    "a row kind that is an object": (
        lambda: json.dumps({**(g := _golden("analyze")), "rows": [{**g["rows"][0], "kind": {"a": 1}}]}),
        ("rows[0].kind", "text"),
    ),
    "a row depth that is a list": (
        lambda: json.dumps({**(g := _golden("analyze")), "rows": [{**g["rows"][0], "depth": []}]}),
        ("rows[0].depth",),
    ),
    "compare summary tuned of numbers": (
        lambda: json.dumps({**(g := _golden("compare")), "summary": {**g["summary"], "tuned": {"t": 3}}}),
        ("summary.tuned",),
    ),
    "schema_version true": (lambda: json.dumps({**_golden("analyze"), "schema_version": True}), ("schema_version",)),
    "nested 100k deep": (lambda: deep_json(100_000), ("deep",)),
    "nested 500 deep inside the rows": (
        lambda: json.dumps(_golden("analyze")).replace('"rows": [', '"rows": [{"x": ' + deep_json(500) + "}, ", 1),
        ("deep",),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REPORT))
def test_report_json(case: str, tmp_path: Path) -> None:
    build, fragments = REPORT[case]
    (tmp_path / "r.json").write_text(build())
    assert_refused(cli("report", tmp_path / "r.json", "-o", tmp_path / "r.html"), 1, "r.json", *fragments)


def test_report_json_deep_on_stdin_through_the_entry_point() -> None:
    proc = run_module("report", "-", "-o", os.devnull + ".html", stdin=deep_json(100_000))
    assert_process_refused(proc, 1, "stdin")


POLICY: dict[str, tuple[str, tuple[str, ...]]] = {
    "nested 5,000 deep": ("[rules]\nalpha_range = " + deep_json(5000) + "\n", ("levels deep",)),
    "nested 5,000 deep in tables": ("[rules]\nno_nonfinite = true\nx = " + "{a = " * 5000 + "1" + "}" * 5000, ("levels deep",)),
    "alpha_range of text": ('[rules]\nalpha_range = ["2", "6"]\n', ("alpha_range", "number")),
    "max_intruders negative": ("[rules]\nmax_intruders = -1\n", ("max_intruders",)),
    "allow_unevaluated of text": ('allow_unevaluated = "yes"\n[rules]\nno_nonfinite = true\n', ("allow_unevaluated",)),
    "overrides a table": ("[rules]\nno_nonfinite = true\n[overrides]\nmodules = 1\n", ("overrides",)),
    "not UTF-8": ("[rules]\n# \udcff\nno_nonfinite = true\n", ("UTF-8",)),
    "a huge array value": ("[rules]\nalpha_range = [" + ", ".join(["1.0"] * 100_000) + "]\n", ("alpha_range",)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(POLICY))
def test_policy(case: str, tmp_path: Path) -> None:
    text, fragments = POLICY[case]
    (tmp_path / "p.toml").write_bytes(text.encode("utf-8", "surrogateescape"))
    ckpt = write_safetensors(tmp_path / "m.safetensors", {NAME: np.eye(4, dtype=np.float32)})
    line = assert_refused(cli("check", ckpt, "--policy", tmp_path / "p.toml"), 2, "p.toml", *fragments)
    assert len(line) < 400  # a 100,000-value array is not echoed back


BASELINE: dict[str, tuple[str, tuple[str, ...]]] = {
    "nested 100k deep": (deep_json(100_000), ("levels deep",)),
    "a module entry that is a list": (json.dumps({"format": "spectra-baseline", "modules": {NAME: [1]}}), ("baseline",)),
    "not UTF-8": ('{"format": "\udcff"}', ("UTF-8",)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BASELINE))
def test_baseline(case: str, tmp_path: Path) -> None:
    text, fragments = BASELINE[case]
    (tmp_path / "b.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    (tmp_path / "p.toml").write_text("[rules]\nmax_drift_pct = 10\n")
    ckpt = write_safetensors(tmp_path / "m.safetensors", {NAME: np.eye(4, dtype=np.float32)})
    r = cli("check", ckpt, "--policy", tmp_path / "p.toml", "--baseline", tmp_path / "b.json")
    assert_refused(r, 2, "b.json", *fragments)


# ---- embeddings, text, activations ---------------------------------------------------------------------------


def test_an_npz_holding_an_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    np.savez(tmp_path / "e.npz", x=np.array([{"a": 1}, None], dtype=object))
    assert_refused(cli("rankme", tmp_path / "e.npz"), 1, "e.npz", "object arrays are refused")


def test_non_utf8_texts_are_one_error(tmp_path: Path) -> None:
    (tmp_path / "texts.txt").write_bytes(b"hello\n\xff\xfe broken\n")
    (tmp_path / "model").mkdir()
    assert_refused(cli("rankme", "--model", tmp_path / "model", "--texts", tmp_path / "texts.txt"), 1,
                   "texts.txt", "not UTF-8")  # fmt: skip


def _activations(path: Path, tensors: dict[str, Any], meta: dict[str, str] | None = None) -> Path:
    return write_safetensors(path, tensors, {"format": "spectra-activations", "version": "1", **(meta or {})})


ACTIVATIONS: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "aliases not a map": (
        lambda t: _activations(t / "a.safetensors", {"m.input_mean": np.zeros(4, np.float32)}, {"aliases": "[1]"}),
        ("aliases",),
    ),
    "aliases nested 100k deep": (
        lambda t: _activations(t / "a.safetensors", {"m.input_mean": np.zeros(4, np.float32)},
                               {"aliases": deep_json(100_000)}),
        ("levels deep",),
    ),
    "a covariance that is not square": (
        lambda t: _activations(t / "a.safetensors", {"m.input_covariance": np.zeros((4, 3), np.float32)}),
        ("not square",),
    ),
    "a token count of floats": (
        lambda t: _activations(t / "a.safetensors", {"m.input_mean": np.zeros(4, np.float32),
                                                     "m.tokens": np.ones(1, np.float32)}),
        ("tokens",),
    ),
    "a boolean field": (
        lambda t: _activations(t / "a.safetensors", {"m.input_mean": np.zeros(4, bool)}),
        ("BOOL",),
    ),
    "fields of different widths": (
        lambda t: _activations(t / "a.safetensors", {"m.input_mean": np.zeros(4, np.float32),
                                                     "m.input_variance": np.ones(5, np.float32)}),
        ("input width",),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ACTIVATIONS))
def test_activations(case: str, base: Path, tmp_path: Path) -> None:
    build, fragments = ACTIVATIONS[case]
    acts = build(tmp_path)
    r = cli("allocate", base, "--budget-rank", "2", "--strategy", "eva", "--activations", acts)
    assert_refused(r, 1, "a.safetensors", *fragments)


# ---- silent wrong results ----------------------------------------------------------------------------------------


def test_merge_refuses_non_finite_weights(tmp_path: Path) -> None:
    from fixtures.merge_cases import full_case

    case = full_case(tmp_path / "case", n=2)
    for weights in ("nan,1", "1,inf", "nan,inf", "-inf,1"):
        out = tmp_path / f"out-{weights}"
        r = cli("merge", case.base_path, *(f"{k}={v}" for k, v in case.paths.items()), "--weights", weights,
                "--out", out)  # fmt: skip
        # a flag value the options refuse is a usage error (exit 2, the message in typer's usage box)
        assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr
        assert "--weights" in r.stderr and "finite" in r.stderr, r.stderr
        assert not out.exists()


def test_merge_refuses_weights_summing_to_zero_where_it_divides_by_their_sum(tmp_path: Path) -> None:
    """tsv gives the tensors outside the merged matrices (norms) the weighted mean Σwᵢ·Δᵢ / Σwᵢ: weights 1,-1
    wrote infinite norms with exit 0. Task arithmetic adds Σwᵢ·Δᵢ, where 1,-1 is a valid task difference."""
    from fixtures.merge_cases import full_case

    case = full_case(tmp_path / "case", n=2)
    tuned = [f"{k}={v}" for k, v in case.paths.items()]
    r = cli(
        "merge", case.base_path, *tuned, "--method", "tsv", "--weights", "1,-1", "--out", tmp_path / "tsv"
    )
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--weights" in r.stderr and "sum to 0" in r.stderr, r.stderr
    r = cli("merge", case.base_path, *tuned, "--method", "task-arithmetic", "--weights", "1,-1", "--out",
            tmp_path / "ta", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr


def _pair(tmp: Path, base: np.ndarray, tuned: np.ndarray) -> tuple[Path, Path]:
    return (write_safetensors(tmp / "base.safetensors", {NAME: base}),
            write_safetensors(tmp / "tuned.safetensors", {NAME: tuned}))  # fmt: skip


def test_an_unchanged_all_zero_matrix_did_not_move(tmp_path: Path) -> None:
    base, tuned = _pair(tmp_path, np.zeros((6, 4), np.float32), np.zeros((6, 4), np.float32))
    r = cli("compare", base, tuned, "-f", "json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["rows"][0]["relative_delta"] == 0.0
    (tmp_path / "p.toml").write_text("[rules]\nmax_relative_delta = 0.1\n")
    assert cli("check", tuned, "--base", base, "--policy", tmp_path / "p.toml").exit_code == 0


def test_a_change_of_an_all_zero_matrix_is_infinite_with_a_note(tmp_path: Path) -> None:
    base, tuned = _pair(tmp_path, np.zeros((6, 4), np.float32), np.eye(6, 4, dtype=np.float32))
    r = cli("compare", base, tuned, "-f", "json")
    row = json.loads(r.stdout)["rows"][0]
    assert row["relative_delta"] is None or row["relative_delta"] == float("inf")  # JSON has no inf: null
    assert "all zeros" in row["note"]


def _two_models(tmp: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(5)
    tuned = write_safetensors(
        tmp / "tuned.safetensors", {NAME: rng.standard_normal((8, 6)).astype(np.float32)}
    )
    other = write_safetensors(
        tmp / "other.safetensors", {"other.weight": rng.standard_normal((8, 6)).astype(np.float32)}
    )
    return tuned, other


def test_a_gate_whose_rule_applied_to_no_module_fails(tmp_path: Path) -> None:
    """--base-spectra of an unrelated model: every verdict of min_effective_rank_ratio was a skip, and the gate
    passed with exit 0 and no word."""
    tuned, other = _two_models(tmp_path)
    (tmp_path / "p.toml").write_text("[rules]\nmin_effective_rank_ratio = 0.9\n")
    r = cli("check", tuned, "--base-spectra", other, "--policy", tmp_path / "p.toml", "-f", "json")
    assert r.exit_code == 1, r.stderr
    (verdict,) = [v for v in json.loads(r.stdout)["rows"] if v["module"] == "(model)"]
    assert verdict["status"] == "fail" and "could not be evaluated" in verdict["message"]
    (tmp_path / "p.toml").write_text("allow_unevaluated = true\n[rules]\nmin_effective_rank_ratio = 0.9\n")
    r = cli("check", tuned, "--base-spectra", other, "--policy", tmp_path / "p.toml", "-f", "json")
    assert r.exit_code == 0, r.stderr
    (verdict,) = [v for v in json.loads(r.stdout)["rows"] if v["module"] == "(model)"]
    assert verdict["status"] == "skip"


def test_a_base_with_no_common_module_leaves_the_intruder_total_unevaluated(tmp_path: Path) -> None:
    tuned, other = _two_models(tmp_path)
    (tmp_path / "p.toml").write_text("[rules]\nmax_intruders = 5\n")
    r = cli("check", tuned, "--base", other, "--allow-missing", "--policy", tmp_path / "p.toml", "-f", "json")
    assert r.exit_code in (1, 2), r.stderr  # never a pass: a failed gate, or a gate that could not run
    assert r.exit_code == 2 or "could not be evaluated" in r.stdout


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float64_beyond_float32_range_is_not_counted_as_inf(backend: str, tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((8, 6)) * 1e39  # finite, beyond float32's 3.4e38
    ckpt = write_safetensors(tmp_path / "big.safetensors", {NAME: w})
    r = cli("analyze", ckpt, "--method", "svd", "--precision", "float32", "--backend", backend, "-f", "json")
    row = json.loads(r.stdout)["rows"][0]
    assert (row["status"], row["nan_count"], row["inf_count"]) == ("ok", 0, 0)
    np.testing.assert_allclose(row["spectral_norm"], np.linalg.svd(w, compute_uv=False)[0], rtol=1e-5)
