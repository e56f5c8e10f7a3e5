"""python -m data_gen: turn an unlabeled corpus into training records with an LLM.

    # an OpenAI-compatible server (vLLM, SGLang, TGI, Ollama, a hosted API)
    python -m data_gen --corpus corpus.jsonl --output gen/ \\
        --base-url http://node17:8000/v1 --model Qwen/Qwen2.5-7B-Instruct --concurrency 64
    # a local model on this GPU node
    python -m data_gen --corpus corpus.jsonl --output gen/ --backend transformers --model /models/qwen2.5-7b

In a SLURM array job the shard defaults to the array task, so `sbatch --array=0-15` splits the corpus
16 ways. Run the same command again after a crash or kill: finished work is skipped.
Exit status: 0 complete, 1 complete but some items failed (run again to retry them), 2 stopped early
or bad input. Bad input (an option out of range, a missing file or directory, an empty corpus or a bad
record) ends with one line `error: ...` on stderr before any model is loaded, any request sent or
anything written.

Credentials: the API key comes from $OPENAI_API_KEY (see --api-key-env); user:password@ in --base-url
are sent as HTTP basic auth instead, and giving both is an error (both would be the Authorization
header). Neither is ever logged or written: URLs are shown without credentials, and server replies
quoted in messages are scrubbed of them.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import urllib.parse
from pathlib import Path

from embedlib.logs import route_logs
from embedlib.records import RecordError

from .backends import HttpConfig, LocalConfig, OpenAIBackend, TransformersBackend
from .corpus import ShardCorpus
from .job import Job, JobConfig
from .output import OutputConflict
from .redact import hide_url_credentials, split_credentials, without_credentials
from .templates import DEFAULT_TEMPLATE_DIR, DEFAULT_TEMPLATES, load_templates

log = logging.getLogger("data_gen")


def slurm_shard() -> tuple[int, int]:
    """(shard, num_shards) from a SLURM array (task ids may start at 1), else (0, 1)."""
    task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return 0, 1
    first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    return int(task_id) - first, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))


class UsageError(Exception):
    """Bad input, found before anything is loaded, sent or written: one line `error: ...`, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line like every other refusal, rather than usage + message
        raise UsageError(message)


DTYPES = ("auto", "bfloat16", "float16", "float32")
# The smallest value of each numeric option; None (unset: a default applies) is always fine.
AT_LEAST = {"--samples": 1, "--concurrency": 1, "--max-tokens": 1, "--max-passage-chars": 1, "--max-docs": 1,
            "--batch-size": 1, "--chunk-size": 1, "--roundtrip-k": 1, "--num-shards": 1, "--max-retries": 0,
            "--max-failures": 0, "--temperature": 0, "--backoff-base": 0, "--backoff-max": 0}
MORE_THAN = {"--timeout": 0, "--flush-seconds": 0}


def template_names(option: str) -> list[str]:
    return [t.strip() for t in option.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, each checked for range and form (no file is looked at); UsageError if one is wrong."""
    p = _Parser(prog="python -m data_gen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="user:password@ in it are sent as HTTP basic auth (then the API key must be unset)")
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
    g.add_argument("--dtype", default="auto", choices=DTYPES)
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
    check_options(args)
    return args


def check_options(args: argparse.Namespace) -> None:
    for option, low in AT_LEAST.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None and not (math.isfinite(value) and value >= low):  # NaN fails too
            raise UsageError(f"{option} must be at least {low}, got {value}")
    for option, low in MORE_THAN.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if not (math.isfinite(value) and value > low):
            raise UsageError(f"{option} must be more than {low}, got {value}")
    if args.backoff_base > args.backoff_max:
        raise UsageError(f"--backoff-base {args.backoff_base:g} is more than --backoff-max {args.backoff_max:g}")
    if not 0 <= args.shard < args.num_shards:
        raise UsageError(f"--shard {args.shard} is not in [0, --num-shards {args.num_shards})")
    names = template_names(args.templates)
    if not names:
        raise UsageError(f"--templates {args.templates!r} names no template")
    for name in names:
        if names.count(name) > 1:  # its work items would be done and written twice
            raise UsageError(f"--templates names {name!r} twice")
    if not args.model.strip():
        raise UsageError("--model is empty")
    try:
        url = urllib.parse.urlsplit(args.base_url)
        url.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        url = None
    # The URL is not quoted: it may hold a password, and one that breaks the parsing is not removable.
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        raise UsageError("--base-url must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1")


def check_paths(args: argparse.Namespace) -> None:
    """The files and directories the options name are there: before the corpus is read or a model loaded."""
    if not args.corpus.is_file():
        raise UsageError(f"--corpus {args.corpus}: {'a directory' if args.corpus.is_dir() else 'no such file'}")
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {args.output}: exists and is not a directory")
    if not args.template_dir.is_dir():
        raise UsageError(f"--template-dir {args.template_dir}: no such directory")
    if not (args.template_dir / args.language).is_dir():
        available = sorted(d.name for d in args.template_dir.iterdir() if d.is_dir())
        raise UsageError(f"--language {args.language}: no directory {args.template_dir / args.language}; "
                         f"available: {', '.join(available) or 'none'}")
    if args.backend == "transformers" and not Path(args.model).is_dir():  # not fetched from a hub either
        raise UsageError(f"--model {args.model}: no such directory (--backend transformers loads a local model)")
    if args.roundtrip_encoder is not None:
        from embedlib.evaluation import EvaluationError, check_model_dir

        try:
            check_model_dir(args.roundtrip_encoder)
        except EvaluationError as e:
            raise UsageError(f"--roundtrip-encoder {e}") from None


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device}: {e}") from None
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def read_inputs(args: argparse.Namespace) -> tuple[list, ShardCorpus]:
    """(templates, this shard's corpus: every record checked in one streaming pass, texts not kept);
    UsageError naming the option or the file, line and field."""
    try:
        templates = load_templates(template_names(args.templates), args.language, args.template_dir)
    except (ValueError, OSError) as e:
        raise UsageError(f"--templates: {e}") from None
    try:
        corpus = ShardCorpus(args.corpus, args.shard, args.num_shards, args.max_docs)
    except RecordError as e:  # names the file, line and field
        raise UsageError(str(e)) from None
    except (ValueError, OSError, EOFError) as e:  # e.g. a truncated .gz
        raise UsageError(f"{args.corpus}: {getattr(e, 'strerror', None) or e}") from None
    if not corpus.num_docs:
        raise UsageError(f"{args.corpus}: no documents (the corpus is empty): nothing to generate from")
    return templates, corpus


def refuse(error: Exception) -> int:
    """One line on stderr, exit status 2. An argparse message may quote the command line: no credentials."""
    print(f"error: {hide_url_credentials(' '.join(str(error).splitlines()))}", file=sys.stderr)
    return 2


async def _run(job: Job, backend):
    async with backend:
        return await job.run()


def http_backend(args: argparse.Namespace) -> OpenAIBackend:
    """Checks the credentials (it connects only once the job runs)."""
    if split_credentials(args.base_url)[1] is not None and os.environ.get(args.api_key_env, "").strip():
        raise UsageError(f"--base-url holds credentials (user:password@) and ${args.api_key_env} is set: both "
                         f"would be the Authorization header; drop the credentials from --base-url or unset "
                         f"{args.api_key_env}")
    try:
        return OpenAIBackend(HttpConfig(
            base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
            concurrency=args.concurrency or 32, timeout=args.timeout, max_retries=args.max_retries,
            backoff_base=args.backoff_base, backoff_max=args.backoff_max,
            temperature=0.7 if args.temperature is None else args.temperature, max_tokens=args.max_tokens,
            json_mode=args.json_mode))
    except ValueError as e:  # an API key that cannot be a header
        raise UsageError(str(e)) from None


def local_backend(args: argparse.Namespace) -> TransformersBackend:
    """Loads the model: the last step before the job, once everything else is known to be right."""
    try:
        return TransformersBackend(LocalConfig(
            model_dir=args.model, batch_size=args.batch_size, max_new_tokens=args.max_tokens,
            temperature=args.temperature or 0.0, device=args.device, dtype=args.dtype,
            trust_remote_code=args.trust_remote_code))
    except (OSError, ValueError) as e:  # not a model directory, no chat template
        raise UsageError(f"--model {args.model}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    # Bad input is found here, cheapest check first, before a model is loaded, a request sent or the
    # output directory created.
    try:
        args = parse_args(argv)
        route_logs(info_from=("data_gen", "embedlib"))  # its own INFO lines; no library notices or bars
        check_paths(args)
        if args.backend == "openai":
            backend = http_backend(args)
        else:
            check_device(args.device)
        templates, corpus = read_inputs(args)
        if args.backend == "transformers":
            backend = local_backend(args)
    except UsageError as e:
        return refuse(e)
    if isinstance(backend, OpenAIBackend):
        concurrency = backend.config.concurrency
        generator_info = {"backend": "openai", "model": args.model, "base_url": without_credentials(args.base_url)}
    else:
        concurrency = args.concurrency or 2 * args.batch_size  # one batch queued while one generates
        generator_info = {"backend": "transformers", "model": args.model, "device": backend.device}
    job = Job(JobConfig(
        output_dir=args.output, generator=args.model, samples=args.samples, seed=args.seed, shard=args.shard,
        num_shards=args.num_shards, max_docs=args.max_docs, concurrency=concurrency, chunk_size=args.chunk_size,
        flush_seconds=args.flush_seconds, max_failures=args.max_failures,
        max_passage_chars=args.max_passage_chars, roundtrip_encoder=args.roundtrip_encoder,
        roundtrip_k=args.roundtrip_k, show_progress=not args.no_progress), backend, corpus, templates)
    try:
        state = asyncio.run(_run(job, backend))
    except (OutputConflict, RecordError) as e:  # another job's directory; damaged files in it
        return refuse(e)
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
