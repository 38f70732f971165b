"""Reading checkpoints: formats, tensor order, values, naming, matrix views, selection, fused splits, errors."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures.checkpoints import GENERATORS, GPT2_CONFIG, LLAMA_CONFIG, Generated
from spectra_cli import errors
from spectra_cli.checkpoint.loader import MatrixLoader
from spectra_cli.checkpoint.matrices import MatrixSpec, Selection, select_matrices
from spectra_cli.checkpoint.naming import parse_names
from spectra_cli.checkpoint.source import Checkpoint, open_checkpoint
from spectra_cli.checkpoint.tensors import to_float

SAFETENSORS_FIXTURES = [
    "single",
    "sharded",
    "bert",
    "half",
    "gpt2",
    "conv",
    "llama",
    "t5",
    "vit",
    "phi3",
    "neox",
]
TORCH_FIXTURES = ["bin", "pt_state_dict", "pth_model", "hf_bin_folder", "hf_bin_sharded", "bf16_pt"]
ALL_FIXTURES = SAFETENSORS_FIXTURES + [f"torch:{k}" for k in TORCH_FIXTURES]


def _get(ckpts, key: str) -> Generated:
    if key.startswith("torch:"):
        return ckpts.torch[key.split(":", 1)[1]]
    return getattr(ckpts, key)


def _logical(ckpt: Checkpoint, spec: MatrixSpec) -> np.ndarray:
    """The matrix as the engine gets it (stored orientation), turned into the logical out×in view."""
    x = to_float(MatrixLoader(ckpt).load(spec), np.float64)
    return x.T if spec.transposed else x


def _select(gen: Generated, **sel) -> tuple[Checkpoint, dict[str, MatrixSpec], dict[str, str]]:
    ckpt = open_checkpoint(gen.path)
    specs, skipped = select_matrices(ckpt, Selection(**sel))
    return ckpt, {s.name: s for s in specs}, {s.name: s.reason for s in skipped}


# ---- the generators themselves ----------------------------------------------------------------------------


def test_generated_checkpoints_are_byte_for_byte_deterministic_and_small(tmp_path):
    import hashlib

    def digests(root):
        return {
            str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*"))
            if f.is_file()
        }

    for name in ("single", "sharded", "gpt2", "torch", "bad"):
        GENERATORS[name](tmp_path / "a" / name)
        GENERATORS[name](tmp_path / "b" / name)
    first, second = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert first == second and len(first) > 20
    assert max(f.stat().st_size for f in (tmp_path / "a").rglob("*") if f.is_file()) < 16 * 1024


# ---- formats and order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ALL_FIXTURES)
def test_every_format_lists_all_tensors_in_read_order(ckpts, key):
    gen = _get(ckpts, key)
    ckpt = open_checkpoint(gen.path)
    assert [t.name for t in ckpt.tensors] == list(gen.order)


@pytest.mark.parametrize(
    ("key", "fmt"),
    [("single", "safetensors"), ("sharded", "safetensors-sharded"), ("bert", "safetensors")]
    + [(f"torch:{k}", "torch") for k in TORCH_FIXTURES if k != "hf_bin_sharded"]
    + [("torch:hf_bin_sharded", "torch-sharded")],
)
def test_format_is_detected(ckpts, key, fmt):
    assert open_checkpoint(_get(ckpts, key).path).format == fmt


def test_sharded_reads_shards_in_order_with_config(ckpts):
    gen = ckpts.sharded
    ckpt = open_checkpoint(gen.path)
    assert [f.name for f in ckpt.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    # shard 1 holds layer 1 and the embeddings, shard 2 layer 0: shard order, not name order
    files = [t.file.name for t in ckpt.tensors]
    assert files == sorted(files)
    assert ckpt.info("model.layers.1.self_attn.q_proj.weight").file.name.startswith("model-00001")
    assert ckpt.info("model.layers.0.self_attn.q_proj.weight").file.name.startswith("model-00002")
    assert ckpt.config == LLAMA_CONFIG
    # the index file itself is also accepted as the path
    via_index = open_checkpoint(gen.path / "model.safetensors.index.json")
    assert [t.name for t in via_index.tensors] == list(gen.order)
    assert via_index.config == LLAMA_CONFIG


def test_hf_folder_reads_config_and_weights(ckpts):
    gen = ckpts.bert
    ckpt = open_checkpoint(gen.path)
    assert ckpt.path == gen.path
    assert ckpt.config == gen.config
    assert [f.name for f in ckpt.files] == ["model.safetensors"]
    assert ckpt.metadata == {"format": "pt"}


def test_torch_wrappers_are_unwrapped_without_prefix(ckpts):
    names = {k: [t.name for t in open_checkpoint(g.path).tensors] for k, g in ckpts.torch.items()}
    assert names["pt_state_dict"] == names["bin"] == names["pth_model"]
    assert not any(n.startswith(("state_dict.", "model.", "optimizer.")) for n in names["pth_model"])
    assert "epoch" not in names["pt_state_dict"]


def test_unknown_tensor_name_is_a_checkpoint_error(ckpts):
    ckpt = open_checkpoint(ckpts.single.path)
    with pytest.raises(errors.CheckpointError, match="no tensor named 'nope'"):
        ckpt.info("nope")


# ---- values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ALL_FIXTURES)
def test_values_read_equal_values_written(ckpts, key):
    gen = _get(ckpts, key)
    ckpt, specs, _ = _select(gen)
    assert set(specs) == set(gen.matrices)
    for name, spec in specs.items():
        expected = gen.matrices[name]
        assert spec.shape == expected.shape, name
        got = _logical(ckpt, spec)
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_bf16_and_fp16_are_exact(ckpts):
    import torch

    gen = ckpts.half
    ckpt, specs, _ = _select(gen)
    assert specs["blocks.0.mlp.fc1.weight"].dtype_name == "bfloat16"
    assert specs["blocks.0.mlp.fc2.weight"].dtype_name == "float16"
    # an independent reader: the official safetensors library, bf16 widened by torch
    from safetensors.torch import load_file

    official = load_file(str(gen.path))
    for name in ("blocks.0.mlp.fc1.weight", "blocks.1.mlp.fc1.weight", "blocks.0.mlp.fc2.weight"):
        raw = ckpt.read(ckpt.info(name))
        want = official[name].to(torch.float32).numpy()
        np.testing.assert_array_equal(to_float(raw, np.float32), want)
        np.testing.assert_array_equal(to_float(raw, np.float64), want.astype(np.float64))


def test_bf16_torch_pickle_is_exact(ckpts):
    gen = ckpts.torch["bf16_pt"]
    ckpt, specs, _ = _select(gen)
    assert {s.dtype_name for s in specs.values()} == {"bfloat16"}
    for name, spec in specs.items():
        np.testing.assert_array_equal(_logical(ckpt, spec), gen.matrices[name])


@pytest.mark.parametrize("key", ["single", "torch:bin"])
def test_partial_reads_rows_and_columns(ckpts, key):
    gen = _get(ckpts, key)
    ckpt = open_checkpoint(gen.path)
    name = next(n for n in gen.matrices if gen.matrices[n].shape == (16, 8))
    info = ckpt.info(name)
    full = gen.matrices[name]
    np.testing.assert_array_equal(to_float(ckpt.read(info, 3, 11)), full[3:11])
    np.testing.assert_array_equal(to_float(ckpt.read(info, 14, 99)), full[14:])
    np.testing.assert_array_equal(to_float(ckpt.read_columns(info, (16, 8), 2, 5)), full[:, 2:5])


@pytest.mark.parametrize(
    ("key", "name"), [("known", "cases.0.tall.weight"), ("known", "cases.0.wide.weight")]
)
def test_chunks_reassemble_the_matrix_along_its_long_side(ckpts, key, name):
    gen = _get(ckpts, key)
    ckpt, specs, _ = _select(gen)
    spec = specs[name]
    pieces = list(MatrixLoader(ckpt).chunks(spec, 7))
    axes = {axis for _, axis in pieces}
    m, n = spec.shape
    assert axes == ({"rows"} if m >= n else {"cols"})
    assert len(pieces) == -(-max(m, n) // 7)
    joined = np.concatenate([to_float(p) for p, _ in pieces], axis=0 if m >= n else 1)
    np.testing.assert_array_equal(joined, gen.matrices[name])


# ---- matrix views: Conv1D, conv kernels, skipped tensors ----------------------------------------------------


def test_gpt2_conv1d_is_transposed_to_out_by_in(ckpts):
    gen = ckpts.gpt2
    ckpt, specs, _ = _select(gen)
    d = GPT2_CONFIG["n_embd"]
    c_attn = specs["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.transposed
    assert c_attn.stored_2d == (d, 3 * d)
    assert c_attn.shape == (3 * d, d)
    assert "Conv1D" in c_attn.note and "transposed" in c_attn.note
    assert specs["transformer.h.0.mlp.c_fc.weight"].shape == (4 * d, d)
    assert specs["transformer.h.0.mlp.c_proj.weight"].shape == (d, 4 * d)
    assert not specs["transformer.wte.weight"].transposed
    np.testing.assert_array_equal(_logical(ckpt, c_attn), gen.matrices["transformer.h.0.attn.c_attn.weight"])


def test_gpt2_attention_mask_buffer_is_skipped(ckpts):
    gen = ckpts.gpt2_mask
    _, specs, skipped = _select(gen)
    assert "transformer.h.0.attn.bias" in skipped
    assert "transformer.h.0.attn.bias" not in specs


def test_linear_named_c_attn_outside_gpt2_is_not_transposed(ckpts):
    gen = ckpts.qwen
    ckpt, specs, _ = _select(gen)
    spec = specs["transformer.h.0.attn.c_attn.weight"]
    assert spec.shape == (24, 8)
    assert not spec.transposed
    assert "Conv1D" not in spec.note
    np.testing.assert_array_equal(_logical(ckpt, spec), gen.matrices["transformer.h.0.attn.c_attn.weight"])


def test_conv_kernels_are_reshaped_with_a_note(ckpts):
    gen = ckpts.conv
    ckpt, specs, skipped = _select(gen)
    k2d = specs["features.conv1.weight"]
    assert k2d.shape == (6, 27) and k2d.stored_2d == (6, 27)
    assert k2d.role == "conv"
    assert "conv kernel 6×3×3×3 reshaped to 6×27" in k2d.note
    k1d = specs["features.conv2.weight"]
    assert k1d.shape == (4, 30) and "reshaped to 4×30" in k1d.note
    np.testing.assert_array_equal(_logical(ckpt, k2d), gen.matrices["features.conv1.weight"])
    assert "3-D tensor that is not a conv kernel" in skipped["features.cls_token"]


@pytest.mark.parametrize("key", ALL_FIXTURES)
def test_vectors_scalars_and_integer_buffers_are_skipped_with_reasons(ckpts, key):
    gen = _get(ckpts, key)
    _, specs, skipped = _select(gen)
    assert set(skipped) == set(gen.skipped)
    for name, fragment in gen.skipped.items():
        assert fragment in skipped[name], (name, skipped[name])
    assert not set(skipped) & set(specs)


@pytest.mark.parametrize("key", ALL_FIXTURES)
def test_notes_say_how_a_tensor_was_viewed(ckpts, key):
    gen = _get(ckpts, key)
    _, specs, _ = _select(gen)
    for name, spec in specs.items():
        if name in gen.notes:
            assert gen.notes[name] in spec.note, (name, spec.note)
        else:
            assert spec.note == "", (name, spec.note)


def test_skip_reasons_are_specific(ckpts):
    _, _, skipped = _select(ckpts.single)
    assert skipped["position_ids"] == "not a floating-point tensor"
    assert skipped["layers.0.attn.q_proj.bias"] == "not a matrix (1-D or scalar)"
    assert skipped["logit_scale"] == "not a matrix (1-D or scalar)"


# ---- naming -----------------------------------------------------------------------------------------------


LLAMA_KINDS = {
    "self_attn.q_proj": ("q_proj", "attention"),
    "self_attn.k_proj": ("k_proj", "attention"),
    "self_attn.v_proj": ("v_proj", "attention"),
    "self_attn.o_proj": ("o_proj", "attention"),
    "mlp.gate_proj": ("gate_proj", "mlp"),
    "mlp.up_proj": ("up_proj", "mlp"),
    "mlp.down_proj": ("down_proj", "mlp"),
}


def test_llama_names(ckpts):
    _, specs, _ = _select(ckpts.llama)
    for layer in (0, 1):
        for path, (kind, role) in LLAMA_KINDS.items():
            s = specs[f"model.layers.{layer}.{path}.weight"]
            assert (s.depth, s.kind, s.role) == (layer, kind, role)
    emb, head = specs["model.embed_tokens.weight"], specs["lm_head.weight"]
    assert (emb.depth, emb.kind, emb.role) == (None, "embed_tokens", "embedding")
    assert (head.depth, head.kind, head.role) == (None, "lm_head", "lm_head")


def test_bert_names_keep_the_three_dense_layers_apart(ckpts):
    _, specs, _ = _select(ckpts.bert)
    for layer in (0, 1):
        p = f"encoder.layer.{layer}"
        got = {k: (specs[f"{p}.{k}.weight"].kind, specs[f"{p}.{k}.weight"].role) for k in (
            "attention.self.query", "attention.self.key", "attention.self.value",
            "attention.output.dense", "intermediate.dense", "output.dense",
        )}  # fmt: skip
        assert got == {
            "attention.self.query": ("query", "attention"),
            "attention.self.key": ("key", "attention"),
            "attention.self.value": ("value", "attention"),
            "attention.output.dense": ("attention.output.dense", "attention"),
            "intermediate.dense": ("intermediate.dense", "mlp"),
            "output.dense": ("output.dense", "mlp"),
        }
        assert {specs[f"{p}.{k}.weight"].depth for k in ("attention.self.query", "output.dense")} == {layer}
    for e in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        s = specs[f"embeddings.{e}.weight"]
        assert (s.depth, s.kind, s.role) == (None, e, "embedding")


def test_gpt2_names(ckpts):
    _, specs, _ = _select(ckpts.gpt2)
    got = {n: (s.depth, s.kind, s.role) for n, s in specs.items()}
    assert got == {
        "transformer.wte.weight": (None, "wte", "embedding"),
        "transformer.wpe.weight": (None, "wpe", "embedding"),
        "transformer.h.0.attn.c_attn.weight": (0, "c_attn", "attention"),
        "transformer.h.0.attn.c_proj.weight": (0, "attn.c_proj", "attention"),
        "transformer.h.0.mlp.c_fc.weight": (0, "c_fc", "mlp"),
        "transformer.h.0.mlp.c_proj.weight": (0, "mlp.c_proj", "mlp"),
    }


def test_t5_names_separate_encoder_and_decoder(ckpts):
    _, specs, _ = _select(ckpts.t5)
    for i in (0, 1):
        enc, dec = f"encoder.block.{i}.layer", f"decoder.block.{i}.layer"
        assert specs[f"{enc}.0.SelfAttention.q.weight"].kind == "encoder.SelfAttention.q"
        assert specs[f"{dec}.0.SelfAttention.q.weight"].kind == "decoder.SelfAttention.q"
        assert specs[f"{dec}.1.EncDecAttention.q.weight"].kind == "decoder.EncDecAttention.q"
        assert specs[f"{dec}.1.EncDecAttention.o.weight"].role == "attention"
        assert specs[f"{enc}.0.SelfAttention.q.weight"].depth == i
        enc_wi, dec_wi = (
            specs[f"{enc}.1.DenseReluDense.wi.weight"],
            specs[f"{dec}.2.DenseReluDense.wi.weight"],
        )
        assert enc_wi.kind != dec_wi.kind
        assert enc_wi.kind.startswith("encoder.") and dec_wi.kind.startswith("decoder.")
        assert (enc_wi.kind, dec_wi.kind) == ("encoder.wi", "decoder.wi")  # as PEFT users name it: "wi"
        assert (enc_wi.role, dec_wi.role) == ("mlp", "mlp")
    # one kind per module type across depths
    assert specs["encoder.block.0.layer.1.DenseReluDense.wo.weight"].kind == (
        specs["encoder.block.1.layer.1.DenseReluDense.wo.weight"].kind
    )
    assert (specs["shared.weight"].kind, specs["shared.weight"].role) == ("shared", "embedding")
    assert specs["lm_head.weight"].role == "lm_head"


def test_t5_ffn_kind_has_no_sublayer_index(ckpts):
    _, specs, _ = _select(ckpts.t5)
    assert specs["encoder.block.0.layer.1.DenseReluDense.wi.weight"].kind == "encoder.wi"
    assert specs["decoder.block.0.layer.2.DenseReluDense.wi.weight"].kind == "decoder.wi"


def test_vit_names(ckpts):
    _, specs, skipped = _select(ckpts.vit)
    p = "vit.encoder.layer.1"
    got = {k: (specs[f"{p}.{k}.weight"].depth, specs[f"{p}.{k}.weight"].kind, specs[f"{p}.{k}.weight"].role) for k in (
        "attention.attention.query", "attention.output.dense", "intermediate.dense", "output.dense",
    )}  # fmt: skip
    assert got == {
        "attention.attention.query": (1, "query", "attention"),
        "attention.output.dense": (1, "attention.output.dense", "attention"),
        "intermediate.dense": (1, "intermediate.dense", "mlp"),
        "output.dense": (1, "output.dense", "mlp"),
    }
    patch = specs["vit.embeddings.patch_embeddings.projection.weight"]
    assert patch.shape == (4, 12) and "reshaped to 4×12" in patch.note
    assert patch.role == "embedding"
    assert "3-D" in skipped["vit.embeddings.position_embeddings"]


def test_parse_names_of_a_plain_sequential():
    info = parse_names(["0.weight", "2.weight", "fc.weight"])
    assert info["0.weight"].depth == 0 and info["2.weight"].depth == 2
    assert info["fc.weight"].depth is None and info["fc.weight"].kind == "fc"


# ---- selection --------------------------------------------------------------------------------------------


def test_include_exclude_globs(ckpts):
    gen = ckpts.llama
    _, specs, skipped = _select(gen, include=("*.mlp.*",))
    assert set(specs) == {n for n in gen.matrices if ".mlp." in n}
    assert not skipped  # filtered-out tensors are not reported as skipped
    _, specs, _ = _select(gen, exclude=("model.embed_tokens.*", "lm_head.*", "*.layers.1.*"))
    assert set(specs) == {n for n in gen.matrices if n.startswith("model.layers.0.")}


def test_include_then_exclude(ckpts):
    gen = ckpts.llama
    _, specs, _ = _select(gen, include=("model.layers.*",), exclude=("*.self_attn.*",))
    assert set(specs) == {n for n in gen.matrices if n.startswith("model.layers.") and ".self_attn." not in n}


def test_kinds_match_kind_or_module_suffix(ckpts):
    gen = ckpts.llama
    _, specs, _ = _select(gen, kinds=("q_proj", "v_proj"))
    assert set(specs) == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")
    }
    _, specs, _ = _select(gen, kinds=("self_attn.o_proj",))  # PEFT-style module-path suffix
    assert set(specs) == {f"model.layers.{i}.self_attn.o_proj.weight" for i in (0, 1)}
    _, specs, _ = _select(ckpts.bert, kinds=("attention.output.dense",))
    assert set(specs) == {f"encoder.layer.{i}.attention.output.dense.weight" for i in (0, 1)}
    _, specs, _ = _select(ckpts.bert, kinds=("intermediate.dense",))
    assert set(specs) == {f"encoder.layer.{i}.intermediate.dense.weight" for i in (0, 1)}


def test_min_dim(ckpts):
    gen = ckpts.llama
    _, specs, _ = _select(gen, min_dim=8)
    assert set(specs) == {n for n, m in gen.matrices.items() if min(m.shape) >= 8}
    assert "model.layers.0.self_attn.k_proj.weight" not in specs  # 4×8
    assert "model.layers.0.self_attn.q_proj.weight" in specs  # 8×8


@pytest.mark.parametrize(
    ("sel", "fragments"),
    [
        (
            {"include": ("nomatch*",)},
            ("no weight matrices selected", "--include nomatch*", "kinds include:", "q_proj"),
        ),
        ({"exclude": ("*",)}, ("--exclude *",)),
        ({"kinds": ("qkv", "w_pack")}, ("--kinds qkv,w_pack", "kinds include:")),
        ({"min_dim": 1000}, ("--min-dim 1000",)),
    ],
)
def test_selecting_nothing_is_a_selection_error_that_says_why(ckpts, sel, fragments):
    gen = ckpts.llama
    with pytest.raises(errors.SelectionError) as exc:
        _select(gen, **sel)
    msg = str(exc.value)
    assert str(gen.path) in msg
    for f in fragments:
        assert f in msg


# ---- fused projections ------------------------------------------------------------------------------------


def _check_parts(gen: Generated, whole: str, shapes: dict[str, tuple[int, int]], kind: str) -> None:
    ckpt, specs, _ = _select(gen, split_fused=True)
    assert whole not in specs
    assert {n for n in specs if n.startswith(whole)} == {f"{whole}[{p}]" for p in shapes}
    for p, shape in shapes.items():
        s = specs[f"{whole}[{p}]"]
        assert s.shape == shape
        assert s.kind == f"{kind}.{p}"
        assert f"part {p} of a fused projection" in s.note
        np.testing.assert_array_equal(_logical(ckpt, s), gen.parts[f"{whole}[{p}]"], err_msg=s.name)
    _, unsplit, _ = _select(gen)
    assert whole in unsplit and not any(n.startswith(whole + "[") for n in unsplit)


def test_split_gpt2_c_attn_into_q_k_v(ckpts):
    whole = "transformer.h.0.attn.c_attn.weight"
    _check_parts(ckpts.gpt2, whole, {"q": (8, 8), "k": (8, 8), "v": (8, 8)}, "c_attn")
    _, specs, _ = _select(ckpts.gpt2, split_fused=True)
    assert all(specs[f"{whole}[{p}]"].transposed for p in "qkv")


def test_split_qkv_proj_with_gqa_sizes_from_config(ckpts):
    # 4 heads, 2 key/value heads, head_dim 16/4 = 4: q 16 rows, k 8, v 8
    shapes = {"q": (16, 16), "k": (8, 16), "v": (8, 16)}
    _check_parts(ckpts.phi3, "model.layers.0.self_attn.qkv_proj.weight", shapes, "qkv_proj")


def test_split_gate_up_proj(ckpts):
    shapes = {"gate": (12, 16), "up": (12, 16)}
    _check_parts(ckpts.phi3, "model.layers.0.mlp.gate_up_proj.weight", shapes, "gate_up_proj")


def test_split_gpt_neox_interleaved_heads(ckpts):
    shapes = {"q": (8, 8), "k": (8, 8), "v": (8, 8)}
    _check_parts(ckpts.neox, "gpt_neox.layers.0.attention.query_key_value.weight", shapes, "query_key_value")


# ---- bad inputs -------------------------------------------------------------------------------------------


BAD = [
    "truncated", "truncated_header", "too_short", "corrupt_header", "wrong_size", "unknown_dtype", "missing_shard",
    "index_names_absent_tensor", "index_not_json", "pickle_list", "pickle_no_tensors", "pickle_object",
    "pickle_garbage", "no_weights", "unknown_format", "missing_path", "bad_config", "only_vectors",
]  # fmt: skip


@pytest.mark.parametrize("key", BAD)
def test_bad_inputs_raise_a_helpful_spectra_error(ckpts, key):
    bad = ckpts.bad[key]
    cls = getattr(errors, bad.error)
    with pytest.raises(cls) as exc:
        ckpt = open_checkpoint(bad.path)
        select_matrices(ckpt, Selection())
    assert isinstance(exc.value, errors.SpectraError)
    msg = str(exc.value)
    assert bad.path.name in msg
    for fragment in bad.message:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_bad_input_list_is_complete(ckpts):
    assert set(ckpts.bad) == {*BAD, "metadata_not_object"}


def test_metadata_that_is_not_an_object_is_a_checkpoint_error(ckpts):
    bad = ckpts.bad["metadata_not_object"]
    with pytest.raises(errors.CheckpointError) as exc:
        open_checkpoint(bad.path)
    assert bad.path.name in str(exc.value) and "corrupt" in str(exc.value)


def test_nonfinite_weights_open_and_select(ckpts):
    """NaN/Inf weights are not a reading error: they are reported by the engine (see test_engine)."""
    gen = ckpts.nonfinite
    ckpt, specs, _ = _select(gen)
    assert set(specs) == set(gen.matrices)
    x = _logical(ckpt, specs["layers.0.nan.weight"])
    assert int(np.isnan(x).sum()) == 2


def test_unsplittable_fused_projection_says_so(tmp_path):
    """A query_key_value of an unknown architecture cannot be split safely: analysed whole, with a note."""
    from fixtures.checkpoints import write_safetensors as write_fixture
    from spectra_cli.checkpoint.matrices import Selection, select_matrices
    from spectra_cli.checkpoint.source import open_checkpoint

    folder = tmp_path / "unknown"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mystery", "num_attention_heads": 2, "hidden_size": 8}')
    w = np.arange(24 * 8, dtype=np.float32).reshape(24, 8)
    write_fixture(folder / "model.safetensors", {"h.0.attn.query_key_value.weight": w})
    specs, _ = select_matrices(open_checkpoint(folder), Selection(split_fused=True))
    assert [s.name for s in specs] == ["h.0.attn.query_key_value.weight"]
    assert specs[0].shape == (24, 8)
    assert "fused projection left whole" in specs[0].note


def test_a_folder_holding_two_copies_of_a_tensor_is_refused(tmp_path, ckpts):
    """Two weight files without an index that define the same tensor: which one is meant is unknowable, so
    the reader refuses instead of analysing both (a NaN in one copy could hide behind the other)."""
    import shutil

    src = ckpts.bert.path / "model.safetensors"
    folder = tmp_path / "two-copies"
    folder.mkdir()
    shutil.copy(src, folder / "a.safetensors")
    shutil.copy(src, folder / "b.safetensors")
    with pytest.raises(errors.CheckpointError, match=r"is in both a\.safetensors and b\.safetensors"):
        open_checkpoint(folder)
