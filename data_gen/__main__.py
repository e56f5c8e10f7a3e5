"""python -m data_gen: turn an unlabeled corpus into training records with an LLM.

    # an OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, a hosted API)
    python -m data_gen --corpus corpus.jsonl --output gen/ \\
        --base-url http://node17:8000/v1 --model Qwen/Qwen2.5-7B-Instruct --concurrency 64
    # a local model on this GPU node
    python -m data_gen --corpus corpus.jsonl --output gen/ --backend transformers --model /models/qwen2.5-7b

In a SLURM array job the shard defaults to the array task, so `sbatch --array=0-15` splits the corpus
16 ways. Run the same command again after a crash or kill: finished work is skipped.
Exit status: 0 complete, 1 complete but some items failed (run again to retry them), 2 stopped early.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import urllib.parse
from pathlib import Path

from embedlib.records import read_corpus

from .backends import HttpConfig, LocalConfig, OpenAIBackend, TransformersBackend
from .job import Job, JobConfig
from .output import OutputConflict
from .templates import DEFAULT_TEMPLATE_DIR, DEFAULT_TEMPLATES, load_templates

log = logging.getLogger("data_gen")


def slurm_shard() -> tuple[int, int]:
    """(shard, num_shards) from a SLURM array (task ids may start at 1), else (0, 1)."""
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return 0, 1
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return int(task_id) - first, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))


def without_credentials(url: str) -> str:
    """The URL as it may be written down: no user:password@ part."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_gen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, type=Path, help="BEIR corpus: .jsonl, .jsonl.gz or .parquet")
    p.add_argument("--output", required=True, type=Path, help="output directory (created; resumed if it exists)")
    p.add_argument("--model", required=True, help="model name on the server, or a model directory (transformers)")
    p.add_argument("--backend", choices=("openai", "transformers"), default="openai")

    g = p.add_argument_group("what to generate")
    g.add_argument("--templates", default=",".join(DEFAULT_TEMPLATES), help="comma-separated template names")
    g.add_argument("--language", default="en", help="template language directory (en, zh)")
    g.add_argument("--template-dir", type=Path, default=DEFAULT_TEMPLATE_DIR)
    g.add_argument("--samples", type=int, default=1, help="samples per passage and template")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=None, help="default 0.7 (openai), 0 = greedy (transformers)")
    g.add_argument("--max-tokens", type=int, default=512, help="most new tokens per reply")
    g.add_argument("--max-passage-chars", type=int, default=6000, help="longer passages are cut in the prompt")
    g.add_argument("--max-docs", type=int, default=None, help="only the shard's first N passages (trial runs)")

    g = p.add_argument_group("openai backend")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="name of the variable holding the API key")
    g.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 32; "
                                                                  "transformers: 2 x batch size)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    g.add_argument("--max-retries", type=int, default=6)
    g.add_argument("--backoff-base", type=float, default=1.0)
    g.add_argument("--backoff-max", type=float, default=60.0)
    g.add_argument("--json-mode", action="store_true", help='send response_format {"type": "json_object"}')

    g = p.add_argument_group("transformers backend")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    g.add_argument("--trust-remote-code", action="store_true")

    g = p.add_argument_group("filters")
    g.add_argument("--roundtrip-encoder", default=None,
                   help="encoder directory: keep a query only if it retrieves its passage within --roundtrip-k")
    g.add_argument("--roundtrip-k", type=int, default=10)

    g = p.add_argument_group("job")
    shard, num_shards = slurm_shard()
    g.add_argument("--shard", type=int, default=shard, help="this job's shard (default: SLURM array task)")
    g.add_argument("--num-shards", type=int, default=num_shards)
    g.add_argument("--chunk-size", type=int, default=64, help="outcomes per append + fsync")
    g.add_argument("--flush-seconds", type=float, default=10.0, help="append + fsync at least this often")
    g.add_argument("--max-failures", type=int, default=100, help="stop after this many failed items")
    g.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.shard < args.num_shards:
        p.error(f"--shard {args.shard} is not in [0, --num-shards {args.num_shards})")
    return args


async def _run(job: Job, backend):
    async with backend:
        return await job.run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        templates = load_templates([t.strip() for t in args.templates.split(",") if t.strip()],
                                   args.language, args.template_dir)
        docs = read_corpus(args.corpus)
    except (ValueError, OSError) as e:  # the message names the file (and line and field)
        log.error("%s", e)
        return 2
    if args.backend == "openai":
        concurrency = args.concurrency or 32
        backend = OpenAIBackend(HttpConfig(
            base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, concurrency=concurrency,
            timeout=args.timeout, max_retries=args.max_retries, backoff_base=args.backoff_base,
            backoff_max=args.backoff_max, temperature=0.7 if args.temperature is None else args.temperature,
            max_tokens=args.max_tokens, json_mode=args.json_mode))
        generator_info = {"backend": "openai", "model": args.model, "base_url": without_credentials(args.base_url)}
    else:
        concurrency = args.concurrency or 2 * args.batch_size  # one batch queued while one generates
        backend = TransformersBackend(LocalConfig(
            model_dir=args.model, batch_size=args.batch_size, max_new_tokens=args.max_tokens,
            temperature=args.temperature or 0.0, device=args.device, dtype=args.dtype,
            trust_remote_code=args.trust_remote_code))
        generator_info = {"backend": "transformers", "model": args.model, "device": backend.device}
    job = Job(JobConfig(
        output_dir=args.output, generator=args.model, samples=args.samples, seed=args.seed, shard=args.shard,
        num_shards=args.num_shards, max_docs=args.max_docs, concurrency=concurrency, chunk_size=args.chunk_size,
        flush_seconds=args.flush_seconds, max_failures=args.max_failures,
        max_passage_chars=args.max_passage_chars, roundtrip_encoder=args.roundtrip_encoder,
        roundtrip_k=args.roundtrip_k, show_progress=not args.no_progress), backend, docs, templates)
    try:
        state = asyncio.run(_run(job, backend))
    except OutputConflict as e:
        log.error("%s", e)
        return 2
    extra = {"generator": generator_info, "corpus": str(args.corpus)}
    if isinstance(backend, OpenAIBackend):
        extra["retries"] = backend.retries
    summary = job.write_summary(state, extra)
    totals, run = summary["totals"], summary["this_run"]
    print(f"{summary['status']}: written {run['written']}, rejected {run['rejected']}, failed {run['failed']}, "
          f"skipped {run['skipped']} this run; output {totals} of {summary['work_items']} -> {job.paths.summary}")
    if summary["status"] != "complete":
        log.error("%s: %s", summary["status"], summary["message"])
        return 2
    if totals["failed"]:
        log.warning("%d items failed; run the same command again to retry them", totals["failed"])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
