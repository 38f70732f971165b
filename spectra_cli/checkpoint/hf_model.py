"""Embedding a text file with a local Hugging Face sentence model, for ``spectra rankme --model DIR --texts FILE``.

The model and tokenizer are loaded with ``transformers.AutoModel`` / ``AutoTokenizer`` from a local folder only
(``HF_HUB_OFFLINE=1``, ``local_files_only=True``: nothing is downloaded). Each text is embedded as the mean of
its last hidden states over the real tokens (attention mask), as sentence-transformers' mean pooling does;
``normalize=True`` adds its L2 normalisation. Texts are processed in batches under ``torch.inference_mode``
on CUDA when present. Needs the ``hf`` extra (transformers).

:func:`load_hf_model` / :func:`load_hf_tokenizer` are the offline loaders ``spectra capture`` uses too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from spectra_cli.checkpoint.validate import Fields, load_json
from spectra_cli.errors import CheckpointError, SpectraError

HF_MISSING = "install the hf extra: pip install 'spectra-cli[hf]'"


def hf_transformers(purpose: str) -> Any:
    """``transformers``, offline (``HF_HUB_OFFLINE=1``: nothing is downloaded), with its loading bars and
    warnings off (spectra draws its own progress bar). ``purpose`` starts the one-line error shown when
    transformers is not installed (e.g. "--model needs transformers")."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise SpectraError(f"{purpose}, which is not installed; {HF_MISSING}") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


#: what transformers raises on a model folder it cannot build (a config of the wrong types, weights of the wrong
#: shapes, …): all mean "this folder does not hold a model transformers can load"
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError)


def load_hf_model(model_dir: Path, device: str, purpose: str, architecture: bool = False,
                  complete: bool = False) -> Any:  # fmt: skip
    """The model of a local Hugging Face folder in float32, eval mode, on ``device`` (a resolved torch device
    name). ``architecture``: the class named by config.json's ``architectures`` (its module names are the
    checkpoint's tensor names), else ``AutoModel`` (the bare encoder/decoder: ``last_hidden_state``).
    ``complete``: refuse a checkpoint that does not hold every weight of the model built from its config
    (transformers would fill the missing ones with a random initialisation)."""
    tf = hf_transformers(purpose)
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(
            f"{model_dir}: not a Hugging Face model folder (no config.json); give the folder holding "
            "config.json, the weights and the tokenizer files"
        )
    try:
        cls = tf.AutoModel
        if architecture:
            config = tf.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
            archs = getattr(config, "architectures", None) or []
            if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
                raise CheckpointError(
                    f"{model_dir}/config.json: 'architectures' must be a list of class names such as "
                    '["LlamaForCausalLM"]; re-save the model (save_pretrained)'
                )
            cls = (getattr(tf, archs[0], None) if archs else None) or tf.AutoModel
        model, info = cls.from_pretrained(str(model_dir), local_files_only=True, output_loading_info=True)
    except _LOAD_ERRORS as e:
        raise CheckpointError(
            f"{model_dir}: transformers could not load the model ({_first_line(e)})"
        ) from None
    missing = sorted((info or {}).get("missing_keys") or [])
    if complete and missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{model_dir}: the checkpoint lacks {len(missing)} weights of the model its config builds "
            f"({', '.join(m[:80] for m in missing[:3])}{more}); transformers would initialise them at random. "
            "Give the complete model folder"
        )
    import torch

    return model.to(device=device, dtype=torch.float32).eval()


def load_hf_tokenizer(path: Path, purpose: str, hint: str) -> Any:
    """The tokenizer of a local folder, with a pad token (eos, unk or bos when it has none) so that batches
    can be padded; ``hint`` ends the error when there is no usable tokenizer."""
    tf = hf_transformers(purpose)
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer ({_first_line(e)}); {hint}") from None
    if tok.pad_token is None:
        for candidate in ("eos_token", "unk_token", "bos_token"):
            if getattr(tok, candidate, None) is not None:
                tok.pad_token = getattr(tok, candidate)
                break
    return tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _max_length(folder: Path, tokenizer: Any, model: Any, requested: int | None) -> int:
    if requested:
        return requested
    limits = [512]
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        with contextlib.suppress(SpectraError):
            value = Fields(load_json(st), str(st)).integer("max_seq_length", None, minimum=1)
            if value is not None:
                limits.append(value)
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        limits.append(tml)
    mpe = getattr(model.config, "max_position_embeddings", None)
    if isinstance(mpe, int) and mpe > 0:
        limits.append(mpe)
    return min(limits)


def iter_embeddings(
    model_dir: Path,
    texts: list[str],
    batch_size: int = 32,
    max_length: int | None = None,
    device: str = "auto",
    normalize: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[np.ndarray]:
    """Yield the mean-pooled sentence embeddings of ``texts``, one float32 (batch × hidden) array per batch of
    ``batch_size`` texts, in order. ``max_length`` (tokens) defaults to the smallest of the model's limits
    (``sentence_bert_config.json``'s max_seq_length, the tokenizer's, max_position_embeddings, 512)."""
    import torch

    from spectra_cli.options import EngineOptions
    from spectra_cli.spectral.engine import resolve

    dev = resolve(EngineOptions(device=device, backend="torch")).device
    model = load_hf_model(model_dir, dev, "--model needs transformers")
    tokenizer = load_hf_tokenizer(
        model_dir, "--model needs transformers", "give the folder holding the model's tokenizer files"
    )
    length = _max_length(model_dir, tokenizer, model, max_length)
    done = 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            enc = tokenizer(batch, padding=True, truncation=True, max_length=length, return_tensors="pt")
            enc = {k: v.to(dev) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
            done += len(batch)
            if progress is not None:
                progress(done, len(texts))
            yield pooled.cpu().numpy()


def embed_texts(model_dir: Path, texts: list[str], **kwargs: Any) -> np.ndarray:
    """All embeddings of ``texts`` as one float32 N×hidden array (see :func:`iter_embeddings`)."""
    return np.concatenate(list(iter_embeddings(model_dir, texts, **kwargs)), axis=0)
