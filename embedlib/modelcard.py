"""The model card of an export (its README.md) and the prompts of its config_sentence_transformers.json.

    datasets = dataset_facts(run.config)        each training data set: kind, size, instructions used
    prompts = training_prompts(datasets)        {"query": the instruction the queries were trained with, ...}
    write_model_card(export_dir, run_dir, step)

The card follows the layout sentence-transformers writes for the models it trains (YAML metadata with a
model-index, model description, usage, evaluation, training details, framework versions, citation),
filled from the run directory as it is when the export is written (embedlib.runlog): the base model,
each data set and its size, the recipe and overrides, the steps, the loss at the export's step and the
latest evaluation in eval.jsonl at or before it. The trainer rewrites it once the export's own
evaluation is logged, so the card of an evaluated export shows that export's figures.

Prompts: the trainer puts a data set's `instruction` (or a record's own) before each query. The export
names the instruction most training queries had "query", so that
`SentenceTransformer(export).encode(texts, prompt_name="query")` gives the embeddings the model was
trained to give its queries; each data set whose texts all had one instruction also gets a prompt
under its own name (`prompt_name="scifact"`).
"""
from __future__ import annotations

import html
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from embedlib.atomic import atomic_write_bytes
from embedlib.exports import EMA_DIR
from embedlib.records import iter_records, read_scored_pairs
from embedlib.runlog import RunLog, eval_figures, latest_evals, read_run

README = "README.md"
CITATION = """@misc{li2024conanembedding,
      title={Conan-embedding: General Text Embedding with More and Better Negative Samples},
      author={Shiyu Li and Yang Tang and Shizhe Chen and Xi Chen},
      year={2024},
      eprint={2408.15710},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2408.15710},
}"""
# Example texts of the usage snippets: neutral ones, not the training data, which may be private.
EXAMPLE_QUERY = "How do statins lower cholesterol?"
EXAMPLE_DOCUMENT = "Statins inhibit HMG-CoA reductase, the enzyme the liver needs to make cholesterol."


@dataclass
class DatasetFacts:
    name: str
    kind: str
    path: str
    size: int  # records trained on (the file's, or `limit` of them)
    corpus: str | None = None
    instructions: dict[str, int] = field(default_factory=dict)  # instruction ("" for none) -> texts with it
    settings: dict = field(default_factory=dict)  # the data set's other options (batch_size, weight, ...)


# One scan per data file and process: an export every few hundred steps should not re-read the data.
_SCANNED: dict[tuple, DatasetFacts] = {}


def dataset_facts(config: dict) -> list[DatasetFacts]:
    """Every data set of a resolved configuration (config.yaml), its records counted as the trainer reads
    them: the first `limit` records, each query's instruction its own or else the data set's."""
    return [_scan(d) for d in config.get("data") or []]


def _scan(d: dict) -> DatasetFacts:
    path = Path(d["path"])
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, d.get("kind"), d.get("limit"), d.get("instruction"))
    if key not in _SCANNED:
        limit, default = d.get("limit"), d.get("instruction") or ""
        instructions: Counter = Counter()
        if d.get("kind") == "sts":  # sentence pairs: the trainer puts no instruction before them
            size = len(read_scored_pairs(path)[:limit])
        else:
            size = 0
            for _, record in iter_records(path):
                if limit is not None and size >= limit:
                    break
                size += 1
                # records.py: "prompt" is an alias of "instruction"; an empty one falls back to the data set's
                instructions[record.get("instruction") or record.get("prompt") or default] += 1
        settings = {k: v for k, v in d.items() if k not in ("name", "kind", "path", "corpus", "instruction")}
        _SCANNED[key] = DatasetFacts(str(d.get("name")), str(d.get("kind")), str(path), size, d.get("corpus"),
                                     dict(instructions), settings)
    return _SCANNED[key]


def training_prompts(datasets: list[DatasetFacts]) -> dict[str, str]:
    """The prompts to save with the model: "query", the instruction most retrieval queries were trained
    with (of all texts when no data set is retrieval), and, under its own name, the instruction of each
    data set whose texts all had the same one. {} when no text was trained with an instruction."""
    if not any(instruction for facts in datasets for instruction in facts.instructions):
        return {}
    counts: Counter = Counter()
    for facts in [f for f in datasets if f.kind == "retrieval"] or datasets:
        counts.update(facts.instructions)
    prompts = {"query": counts.most_common(1)[0][0]}
    for facts in datasets:
        if len(facts.instructions) == 1 and facts.name not in ("query", "document"):
            instruction = next(iter(facts.instructions))
            if instruction:
                prompts[facts.name] = instruction
    return prompts


def write_model_card(export_dir: str | os.PathLike, run_dir: str | os.PathLike, step: int,
                     model_path: str | os.PathLike | None = None) -> None:
    """(Re)write export_dir/README.md atomically. model_path: where the export is read from in the usage
    snippets (default export_dir; the trainer writes the card before the export is renamed into place)."""
    export_dir = Path(export_dir)
    text = model_card(export_dir, read_run(run_dir), step, Path(model_path or export_dir))
    atomic_write_bytes(export_dir / README, text.encode("utf-8"))


# ---- the card --------------------------------------------------------------------------------------


def model_card(export_dir: Path, run: RunLog, step: int, model_path: Path) -> str:
    model = _model_facts(export_dir)
    datasets = dataset_facts(run.config)
    metrics = [m for m in run.metrics if m["step"] <= step]
    # The average beside the raw weights (train.ema) was not evaluated: the evaluation is the raw export's.
    averaged_beside = export_dir.name == EMA_DIR and _ema_decay(run.config) is not None
    evals = [e for e in run.evals if e["step"] <= step and not averaged_beside]
    latest = latest_evals(evals)
    latest_eval = latest[0] if latest else None
    base = str((run.config.get("model") or {}).get("path", "unknown"))
    hub_base = base if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists() else None
    name = f"{run.path.resolve().name}, step {step}"  # raw in the YAML metadata; _text() where Markdown
    evaluation = run.config.get("evaluation") or {}
    sections = _eval_sections(latest, evaluation)
    # The metadata the Hugging Face hub reads (model-index: the figures shown beside the model).
    front: dict = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                   "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "conan-embedding",
                            f"dataset_size:{sum(d.size for d in datasets)}"]}
    if hub_base:
        front["base_model"] = hub_base
    if latest_eval:
        front["model-index"] = [{"name": name, "results": [{
            "task": {"type": category},
            "dataset": {"name": data, "type": data, **({"split": split} if split else {})},
            "metrics": [{"type": key.replace("@", "_at_"), "value": value, "name": key} for key, value in figures]}
            for category, data, split, figures in sections]}]

    base_text = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else _code(base)
    names = f"{_and_list([_text(d.name) for d in datasets])} data set{'s' if len(datasets) > 1 else ''}"
    out = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", "",
           f"# {_text(name)}", "",
           f"This is a [sentence-transformers](https://www.SBERT.net) model finetuned from {base_text} on the {names} "
           f"with the recipe of [Conan-embedding](https://arxiv.org/abs/2408.15710) (hard negatives mined with "
           f"the model being trained, the cross-GPU batch balance loss). It maps texts to a "
           f"{model['dimension']}-dimensional dense vector space and can be used for retrieval, semantic "
           "textual similarity, clustering and classification.", "",
           "## Model Details", "", "### Model Description", "- **Model Type:** Sentence Transformer",
           f"- **Base model:** {base_text}", f"- **Maximum Sequence Length:** {model['max_length']} tokens",
           f"- **Output Dimensionality:** {model['dimension']} dimensions",
           "- **Similarity Function:** Cosine Similarity",
           f"- **Pooling:** {model['pooling']}{', projection to ' + str(model['dimension']) if model['dense'] else ''}"
           f"{', normalised' if model['normalize'] else ''}",
           f"- **Training Dataset{'s' if len(datasets) > 1 else ''}:**",
           *[f"    - {_text(d.name)} ({_text(d.kind)}, {d.size:,} {'pairs' if d.kind != 'classification' else 'texts'})"
             for d in datasets]]
    if model["prompts"]:
        out.append("- **Prompts:** " + ", ".join(f"{_code(k)}: {_text(json.dumps(v, ensure_ascii=False))}"
                                                 for k, v in model["prompts"].items()))
    out += ["", "### Full Model Architecture", "", "```", "SentenceTransformer(",
            *[f"  ({i}): {module}" for i, module in enumerate(model["modules"])], ")", "```", ""]
    out += _usage(model, model_path)
    if latest_eval:
        note = "" if latest_eval["step"] == step else " (an earlier export of this run; this export was not evaluated)"
        out += ["", "## Evaluation", "", "### Metrics"]
        for category, data, split, figures in sections:
            how = " (exact search over the whole corpus)" if category == "retrieval" else ""
            out += ["", f"#### {CATEGORY_TITLES.get(category, _text(category))}: {_text(data)}"
                    + (f", split {_text(split)}" if split else ""), "",
                    f"* Evaluated during training with `embedlib.evaluation`{how} at step {latest_eval['step']}{note}",
                    "", "| Metric | Value |", "|:--|--:|",
                    *[f"| {_text(key)} | {value:.4f} |" for key, value in figures]]
    out += ["", "## Training Details", "", f"### Training Dataset{'s' if len(datasets) > 1 else ''}", ""]
    for d in datasets:
        out += [f"#### {_text(d.name)}", "", f"* Kind: {_text(d.kind)}", f"* Path: {_code(d.path)}"]
        if d.corpus:
            out.append(f"* Corpus: {_code(d.corpus)}")
        out.append(f"* Size: {d.size:,} training samples")
        used = [(i, n) for i, n in d.instructions.items() if i]
        if used:
            out.append("* Instruction: " + "; ".join(f"{_text(json.dumps(i, ensure_ascii=False))} ({n:,} samples)"
                                                     for i, n in used))
        out += [f"* {_text(', '.join(f'{k}: {v}' for k, v in d.settings.items()))}", ""]
    out += _procedure(run, metrics, step, export_dir)
    out += _training_logs(metrics, evals)
    versions = {**(run.run.get("versions") or {}), **model["versions"]}
    out += ["", "### Framework Versions", *[_text(f"- {k}: {v}") for k, v in sorted(versions.items()) if v], "",
            "## Citation", "", "### BibTeX", "", "#### Conan-embedding", "```bibtex", CITATION, "```", ""]
    return "\n".join(out)


def _ema_decay(config: dict) -> float | None:
    return (config.get("train") or {}).get("ema")


def _weights_line(config: dict, export_dir: Path) -> list[str]:
    """train.ema: whether this card's weights are the average or the raw weights with the average beside."""
    decay = _ema_decay(config)
    if decay is None:
        return []
    if export_dir.name == EMA_DIR or (config.get("train") or {}).get("ema_export") == "instead":
        return [f"* Weights: the exponential moving average of the trained weights (decay {_text(decay)}, "
                "updated after every optimizer step)"]
    return [f"* Weights: the trained weights; their exponential moving average (decay {_text(decay)}) is in "
            f"{_code(EMA_DIR + '/')} beside them"]


def _procedure(run: RunLog, metrics: list[dict], step: int, export_dir: Path) -> list[str]:
    recipe, overrides = run.recipe_and_overrides()
    config = run.config
    ds = run.run.get("ds_config") or {}
    zero = (ds.get("zero_optimization") or {}).get("stage")
    out = ["### Training Procedure", "", f"* Recipe: {_code(recipe)}" if recipe else "* Recipe: unknown"]
    if overrides:
        out += ["* Overrides:", *[f"    - {_code(o)}" for o in overrides]]
    max_steps = run.max_steps
    out.append(f"* Steps: {step:,}" + (f" of {max_steps:,}" if max_steps else "")
               + f", {sum(m.get('samples', 0) for m in metrics):,} samples"
               + (f", world size {run.run['world_size']}" if run.run.get("world_size") else "")
               + (f", DeepSpeed ZeRO stage {zero}" if zero is not None else ""))
    out += _weights_line(config, export_dir)
    if metrics:
        last = metrics[-1]
        recent = [m["loss"] for m in metrics[-10:]]
        per_kind = ", ".join(f"{k.removeprefix('loss/')} {v:.4f}" for k, v in last.items() if k.startswith("loss/"))
        out.append(f"* Final loss: {last['loss']:.4f} at step {last['step']}" + (f" ({per_kind})" if per_kind else "")
                   + f"; mean of the last {len(recent)} steps {sum(recent) / len(recent):.4f}")
        versions = last.get("negatives_version") or {}
        if versions:
            mined = {r.version: r.export_step for r in run.refreshes if r.version is not None}
            out.append("* Hard negatives in use: " + _text(", ".join(
                f"{name} version {v} (mined with the model of step {mined[v]})" if v in mined
                else f"{name} {'version ' + str(v) if v is not None else 'in-batch and given negatives only'}"
                for name, v in versions.items())))
    loss = config.get("loss") or {}
    if loss:
        out.append("* Loss: CBB (InfoNCE over the negatives of all retrieval ranks, CoSENT for STS): "
                   + _text(", ".join(f"{k}={v}" for k, v in loss.items())))
    out += ["", "### Training Hyperparameters", "", "<details><summary>Click to expand</summary>", ""]
    out += [f"- {_code(k)}: {_text(v)}" for k, v in _flatten({k: v for k, v in config.items() if k not in ("data", "run_dir")})]
    out += ["", "</details>"]
    return out


CATEGORY_TITLES = {"retrieval": "Retrieval", "sts": "Semantic Similarity", "pair_classification": "Pair Classification",
                   "classification": "Classification"}


def _eval_sections(latest: list[dict], evaluation: dict) -> list[tuple[str, str, str | None, list]]:
    """(category, data set name, split or None, figures) of each set of the latest evaluation; a record of
    an older run (no "set") is evaluation.beir's retrieval on evaluation.split."""
    split = evaluation.get("split", "dev")
    listed = {s.get("name"): s for s in evaluation.get("sets") or [] if isinstance(s, dict)}
    sections = []
    for record in latest:
        if "set" not in record:
            sections.append(("retrieval", Path(evaluation.get("beir") or "dev").name, split, eval_figures(record)))
            continue
        category = str(record.get("category", "retrieval"))
        spec = listed.get(record["set"], {})
        set_split = spec.get("split", "dev") if spec else split  # not listed: evaluation.beir's set
        sections.append((category, str(record["set"]), set_split if category == "retrieval" else None,
                         eval_figures(record)))
    return sections


def _training_logs(metrics: list[dict], evals: list[dict]) -> list[str]:
    """sentence-transformers' table: the loss at about ten steps, and the figures of each evaluation."""
    if not metrics:
        return []
    loss_at = {m["step"]: m["loss"] for m in metrics}
    shown = sorted({metrics[round(i * (len(metrics) - 1) / 9)]["step"] for i in range(10)} | {e["step"] for e in evals}
                   | {metrics[-1]["step"]})

    def named(e: dict) -> list[tuple[str, float]]:  # a set's figures carry its name
        return [(f"{e['set']} {k}" if "set" in e else k, v) for k, v in eval_figures(e)]

    by_step: dict[int, dict] = {}
    for e in evals:
        by_step.setdefault(e["step"], {}).update(named(e))
    names = list(dict.fromkeys(k for e in evals for k, _ in named(e)))
    header = ["Step", "Training Loss", *map(_text, names)]
    rows = ["", "### Training Logs", "", "| " + " | ".join(header) + " |", "|" + "--:|" * len(header)]
    for s in shown:
        loss = f"{loss_at[s]:.4f}" if s in loss_at else "-"
        figures = [f"{by_step[s][n]:.4f}" if s in by_step and n in by_step[s] else "-" for n in names]
        rows.append("| " + " | ".join([str(s), loss, *figures]) + " |")
    return rows


def _usage(model: dict, path: Path) -> list[str]:
    quoted = json.dumps(str(path))
    query_prompt = model["prompts"].get("query", "")
    encode_queries = 'model.encode(queries, prompt_name="query")' if query_prompt else "model.encode(queries)"
    st = ["```python", "from sentence_transformers import SentenceTransformer", "",
          f"model = SentenceTransformer({quoted})", f"queries = [{json.dumps(EXAMPLE_QUERY)}]",
          f"documents = [{json.dumps(EXAMPLE_DOCUMENT)}]",
          f"query_embeddings = {encode_queries}"
          + ("  # the instruction the model was trained with goes before each query" if query_prompt else ""),
          "document_embeddings = model.encode(documents)",
          "print(model.similarity(query_embeddings, document_embeddings))", "```"]
    pooling = {
        "mean": ["    mask = batch[\"attention_mask\"].unsqueeze(-1).float()",
                 "    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over the real tokens"],
        "cls": ["    first = batch[\"attention_mask\"].argmax(1)  # the first real token",
                "    pooled = hidden[torch.arange(len(hidden)), first]"],
        "last_token": ["    positions = torch.arange(hidden.shape[1])",
                       "    last = (batch[\"attention_mask\"] * positions).argmax(1)  # the last real token",
                       "    pooled = hidden[torch.arange(len(hidden)), last]"],
    }[model["pooling"]]
    dense = []
    if model["dense"]:
        dense = [f"    dense = load_file({json.dumps(str(path / model['dense'] / 'model.safetensors'))})",
                 "    pooled = pooled @ dense[\"linear.weight\"].T"
                 + (" + dense[\"linear.bias\"]" if model["dense_bias"] else "")]
    tf = ["```python", "import torch", "import torch.nn.functional as F",
          *(["from safetensors.torch import load_file"] if dense else []),
          "from transformers import AutoModel, AutoTokenizer", "",
          f"tokenizer = AutoTokenizer.from_pretrained({quoted})",
          f"model = AutoModel.from_pretrained({quoted}).eval()", "", "",
          "def embed(texts):", f"    batch = tokenizer(texts, padding=True, truncation=True, "
                                f"max_length={model['max_length']}, return_tensors=\"pt\")",
          "    with torch.no_grad():", "        hidden = model(**batch).last_hidden_state.float()",
          *pooling, *dense, "    return F.normalize(pooled, dim=-1)" if model["normalize"] else "    return pooled",
          "", "", f"queries = [{json.dumps(EXAMPLE_QUERY)}]", f"documents = [{json.dumps(EXAMPLE_DOCUMENT)}]"]
    if query_prompt:
        tf += [f"instruction = {json.dumps(query_prompt, ensure_ascii=False)}  # as in training",
               "query_embeddings = embed([instruction + q for q in queries])"]
    else:
        tf.append("query_embeddings = embed(queries)")
    tf += ["document_embeddings = embed(documents)",
           "print(query_embeddings @ document_embeddings.T)" if model["normalize"]
           else "print(F.cosine_similarity(query_embeddings[:, None], document_embeddings[None], dim=-1))", "```"]
    return ["## Usage", "", "### Direct Usage (Sentence Transformers)", "", "```bash",
            "pip install -U sentence-transformers", "```", "", *st, "", "### Direct Usage (Transformers)", "",
            "<details><summary>Click to see the direct usage in Transformers</summary>", "", *tf, "", "</details>"]


def _model_facts(export_dir: Path) -> dict:
    """What the saved files say about the model (embedlib.encoder.Encoder.save writes them)."""
    def read(name: str) -> dict:
        return json.loads((export_dir / name).read_text(encoding="utf-8"))

    modules = read("modules.json")
    kinds = {m["type"].rsplit(".", 1)[-1]: m["path"] for m in modules}
    pooling = read(f"{kinds['Pooling']}/config.json")
    transformer = read("sentence_bert_config.json")
    backbone = read("config.json")
    st = read("config_sentence_transformers.json")
    dense = read(f"{kinds['Dense']}/config.json") if "Dense" in kinds else None
    mode = {"lasttoken": "last_token"}.get(pooling["pooling_mode"], pooling["pooling_mode"])
    architecture = (backbone.get("architectures") or [backbone.get("model_type", "?")])[0]
    described = [f"Transformer({{'max_seq_length': {transformer['max_seq_length']}, "
                 f"'architecture': '{architecture}'}})",
                 f"Pooling({{'embedding_dimension': {pooling['embedding_dimension']}, 'pooling_mode': '{mode}'}})"]
    if dense:
        described.append(f"Dense({{'in_features': {dense['in_features']}, 'out_features': {dense['out_features']}, "
                         f"'bias': {dense['bias']}, 'activation_function': 'Identity'}})")
    if "Normalize" in kinds:
        described.append("Normalize()")
    return {
        "pooling": mode, "max_length": transformer["max_seq_length"], "modules": described,
        "dimension": dense["out_features"] if dense else pooling["embedding_dimension"],
        "dense": kinds.get("Dense"), "dense_bias": bool(dense and dense.get("bias")),
        "normalize": "Normalize" in kinds,
        "prompts": {k: v for k, v in (st.get("prompts") or {}).items() if v},
        "versions": {{"pytorch": "torch"}.get(k, k.replace("_", "-")): v
                     for k, v in (st.get("__version__") or {}).items()},
    }


def _text(value) -> str:
    """User input (run, task, data set names, settings) as Markdown text: its HTML escaped, so that a
    renderer that does not sanitise shows a `<script>` in a task name instead of running it."""
    return html.escape(str(value), quote=False)


def _code(value) -> str:
    """User input as a Markdown code span (whose HTML is literal), fenced by more backticks than it holds."""
    text = str(value).replace("\n", " ")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _and_list(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def _flatten(value, prefix: str = ""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), value
