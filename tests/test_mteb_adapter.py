"""embedlib.mteb_adapter: an export handed to mteb encodes as our Encoder does, with instructions as
prompts, and mteb's own retrieval evaluation of it agrees with embedlib.evaluation. Nothing is
downloaded: the task is built here from a slice of the bundled SciFact. Skipped without mteb."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")
# mteb's own deprecation notices about sentence-transformers names; nothing to act on here.
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning:mteb"),
              pytest.mark.filterwarnings("ignore::FutureWarning:mteb")]

from embedlib.encoder import Encoder  # noqa: E402
from embedlib.evaluation import BeirSplit, evaluate_retrieval  # noqa: E402
from embedlib.mteb_adapter import mteb_model  # noqa: E402

TEXTS = ["Aspirin lowers the risk of heart attacks.", "Stem cells divide.", "A short query",
         "Vitamin D deficiency is common in northern countries during winter."]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_bert_dir) -> Path:
    directory = tmp_path_factory.mktemp("export") / "step_00000007"
    Encoder.from_pretrained(tiny_bert_dir, max_length=64).save(directory)
    return directory


def _local_retrieval_task(split: BeirSplit):
    """An mteb retrieval task whose data is `split`, held in memory (nothing to download)."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    class LocalSciFactSlice(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name="LocalSciFactSlice", type="Retrieval", main_score="ndcg_at_10",
            description="A slice of the bundled SciFact dev split, for the adapter test.",
            reference="https://github.com/allenai/scifact", dataset={"path": "NA", "revision": "NA"},
            category="t2t", eval_splits=["dev"], eval_langs=["eng-Latn"], date=("2020-01-01", "2020-12-31"),
            dialect=[], domains=["Academic"], task_subtypes=[], license="cc-by-4.0",
            annotations_creators="expert-annotated", modalities=["text"], sample_creation="found",
            bibtex_citation="",
        )

        def load_data(self, num_proc=None, **kwargs) -> None:
            data = RetrievalSplitData(
                corpus=Dataset.from_list([{"id": d.id, "title": d.title, "text": d.text} for d in split.corpus]),
                queries=Dataset.from_list([{"id": q.id, "text": q.text} for q in split.queries]),
                relevant_docs={q.id: dict(split.qrels[q.id]) for q in split.queries},
                top_ranked=None,
            )
            self.dataset = {"default": {"dev": data}}
            self.data_loaded = True

    return LocalSciFactSlice()


def _encode(model, texts: list[str], prompt_type) -> np.ndarray:
    """mteb's encode protocol by hand: a DataLoader of {"text": [...]} batches."""
    from datasets import Dataset
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
    from torch.utils.data import DataLoader

    loader = DataLoader(Dataset.from_dict({"text": texts}), batch_size=3)
    return np.asarray(model.encode(loader, task_metadata=MockRetrievalTask.metadata, hf_split="test",
                                   hf_subset="default", prompt_type=prompt_type))


def test_encode_protocol_matches_our_encoder_with_instructions(tiny_export):
    from mteb.types import PromptType

    model = mteb_model(tiny_export, query_instruction="query: ", document_instruction="passage: ")
    ours = Encoder.from_pretrained(tiny_export)
    queries = _encode(model, TEXTS, PromptType.query)
    passages = _encode(model, TEXTS, PromptType.document)
    np.testing.assert_allclose(queries, ours.encode(["query: " + t for t in TEXTS], show_progress=False), atol=1e-5)
    np.testing.assert_allclose(passages, ours.encode(["passage: " + t for t in TEXTS], show_progress=False), atol=1e-5)
    assert np.abs(queries - passages).max() > 1e-3  # the instructions did reach the model
    similarity = np.asarray(model.similarity(queries, passages))
    np.testing.assert_allclose(similarity, queries @ passages.T, atol=1e-5)  # normalised: cosine = dot


def test_model_meta_names_each_export_apart(tiny_export, tmp_path, tiny_bert_dir):
    import torch

    meta = mteb_model(tiny_export).mteb_model_meta
    assert meta.name == "conan-embedding/step_00000007" and len(meta.revision) == 12
    assert meta.embed_dim == 32 and meta.max_tokens == 64
    torch.manual_seed(1)
    other = tmp_path / "step_00000007"  # same name, other weights: the revision tells them apart
    Encoder.from_pretrained(tiny_bert_dir, output_dim=16).save(other)
    assert mteb_model(other).mteb_model_meta.revision != meta.revision


def test_not_a_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no modules.json"):
        mteb_model(tmp_path)


def test_mteb_evaluate_agrees_with_embedlib_evaluation(minilm_dir, scifact_dir, tmp_path):
    split = BeirSplit.load(scifact_dir, "dev")
    queries = split.queries[:8]
    relevant = {d for q in queries for d in split.qrels[q.id]}
    corpus = [d for d in split.corpus if d.id in relevant] + [d for d in split.corpus if d.id not in relevant][:80]
    small = BeirSplit(corpus=corpus, queries=queries, qrels=split.qrels)

    export = tmp_path / "minilm"
    Encoder.from_pretrained(minilm_dir, max_length=64).save(export)
    ours = evaluate_retrieval(Encoder.from_pretrained(export), small, show_progress=False)
    result = mteb.evaluate(mteb_model(export), _local_retrieval_task(small), cache=None, show_progress_bar=False)
    scores = result.task_results[0].scores["dev"][0]
    assert scores["ndcg_at_10"] == pytest.approx(ours["ndcg@10"], abs=1e-4)
    assert scores["recall_at_100"] == pytest.approx(ours["recall@100"], abs=1e-4)
    assert scores["mrr_at_10"] == pytest.approx(ours["mrr@10"], abs=1e-4)
    assert ours["ndcg@10"] > 0.5  # a real model on real data, not two agreeing zeros
