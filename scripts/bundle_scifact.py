"""Build the bundled SciFact demo data in data/scifact/ from a BEIR copy of SciFact.

Run once by a maintainer (the output is committed); a user's clone never needs the source:

    python scripts/bundle_scifact.py ../shared/data/scifact data/scifact

The 809 training queries are split 75/25 into train and dev with a fixed seed, so every
clone trains and evaluates on the same queries. The dev split is only ever used for evaluation.
"""
import argparse
import gzip
import json
import random
import shutil
from pathlib import Path

SEED = 20240815  # the Conan-embedding arXiv date; any fixed value works
DEV_FRACTION = 0.25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args()
    args.target.mkdir(parents=True, exist_ok=True)

    shutil.copyfile(args.source / "corpus.jsonl.gz", args.target / "corpus.jsonl.gz")
    corpus = {}
    with gzip.open(args.source / "corpus.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            corpus[doc["_id"]] = doc

    queries = [json.loads(line) for line in open(args.source / "queries.train.jsonl", encoding="utf-8")]
    qrels: dict[str, list[str]] = {}
    with open(args.source / "qrels.train.tsv", encoding="utf-8") as f:
        next(f)  # header
        for line in f:
            qid, did, score = line.rstrip("\n").split("\t")
            if int(score) > 0:
                qrels.setdefault(qid, []).append(did)

    ids = sorted(q["_id"] for q in queries)
    random.Random(SEED).shuffle(ids)
    n_dev = round(len(ids) * DEV_FRACTION)
    split_of = {qid: ("dev" if i < n_dev else "train") for i, qid in enumerate(ids)}

    for split in ("train", "dev"):
        chosen = [q for q in queries if split_of[q["_id"]] == split]
        with open(args.target / f"queries.{split}.jsonl", "w", encoding="utf-8") as f:
            for q in chosen:
                f.write(json.dumps({"_id": q["_id"], "text": q["text"]}, ensure_ascii=False) + "\n")
        with open(args.target / f"qrels.{split}.tsv", "w", encoding="utf-8") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q in chosen:
                for did in qrels[q["_id"]]:
                    f.write(f"{q['_id']}\t{did}\t1\n")
        if split == "train":
            # Training pairs in the FlagEmbedding format, with ids into the corpus.
            with gzip.open(args.target / "pairs.train.jsonl.gz", "wt", encoding="utf-8") as f:
                for q in chosen:
                    pos_ids = qrels[q["_id"]]
                    record = {
                        "query": q["text"],
                        "query_id": q["_id"],
                        "pos": [passage_text(corpus[d]) for d in pos_ids],
                        "pos_ids": pos_ids,
                        "neg": [],
                        "task": "scifact",
                    }
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"{split}: {len(chosen)} queries")


def passage_text(doc: dict) -> str:
    """How a BEIR document becomes one passage: title and text, as BEIR evaluation does."""
    return f"{doc['title']} {doc['text']}".strip()


if __name__ == "__main__":
    main()
