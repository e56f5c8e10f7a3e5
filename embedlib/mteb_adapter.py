"""Hand an exported model to MTEB (the `mteb` package, 2.x), where it is installed.

    import mteb
    from embedlib.mteb_adapter import mteb_model

    model = mteb_model("runs/quickstart/exports/step_00000040", query_instruction="")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact", "STSBenchmark"]))

An export (embedlib.exports) is a sentence-transformers directory, so the adapter is thin: it loads
the directory with sentence_transformers.SentenceTransformer and wraps it in mteb's own
SentenceTransformerEncoderWrapper, which implements mteb's EncoderProtocol (encode over a DataLoader of
{"text": [...]} batches, query/document prompt types, similarity). What it adds:

- instructions as mteb prompts: `query_instruction` is put before every query (prompt type "query"),
  `document_instruction` before every passage, as the trainer and the miners do (`data.*.instruction`,
  `--query-instruction`);
- a model name and revision for mteb's result cache: the name `conan-embedding/<directory name>` and,
  as revision, the first 12 hex digits of the export's content fingerprint, so results of two exports
  (step_00000020 of one run and of another) never overwrite each other in ~/.cache/mteb.

mteb is not a dependency of this project (`pip install mteb` to use this); the datasets of MTEB's
tasks are downloaded by mteb from the Hugging Face hub.
"""
from __future__ import annotations

import os
from pathlib import Path

from embedlib.encoder import model_fingerprint


def mteb_model(
    model_dir: str | os.PathLike,
    *,
    query_instruction: str = "",
    document_instruction: str = "",
    name: str | None = None,
    max_length: int | None = None,
    device: str | None = None,
):
    """An mteb encoder (mteb.models.SentenceTransformerEncoderWrapper) for an export or any
    sentence-transformers model directory; pass it to mteb.evaluate.

    max_length: tokens per text (default: the directory's max_seq_length); device: None lets
    sentence-transformers choose (a GPU when there is one).
    """
    try:
        from mteb.models import SentenceTransformerEncoderWrapper
    except ImportError as error:
        raise ImportError("embedlib.mteb_adapter needs the mteb package: pip install mteb") from error
    from sentence_transformers import SentenceTransformer

    path = Path(model_dir)
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path}: not a sentence-transformers model directory (no modules.json); "
                                "give an export directory such as RUN/exports/step_00000040")
    # Both prompt types are named (mteb warns otherwise), even when one instruction is empty; mteb
    # takes the model's own prompts when it is given none.
    prompts = {"query": query_instruction, "document": document_instruction}
    model = SentenceTransformer(str(path), device=device, prompts=prompts, local_files_only=True)
    if max_length is not None:
        model.max_seq_length = max_length
    wrapper = SentenceTransformerEncoderWrapper(model)
    wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(
        update={"name": name or f"conan-embedding/{path.resolve().name}", "revision": model_fingerprint(path)[:12]}
    )
    return wrapper
