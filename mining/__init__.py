"""mining entrypoint: a model and a corpus in, ranked hard-negative candidates for every training query out,
published as versions of the run's negative store (embedlib.negstore).

    python -m mining mine --model DIR --corpus CORPUS --queries PAIRS --run-dir RUN [--k 200] ...
    mpiexec -n 4 python -m mining mine ...   |   srun -n 4 python -m mining mine ...
    torchrun --nproc_per_node 4 -m mining mine ...
    python -m mining sidecar --run-dir RUN [--every 1] [--stop-when-finished] [--poll-seconds 10] [--keep-versions 3]
        [--full-every N [--partial-depth D] [--partial-sample F]]

Modules:
    spec         MiningSpec (RUN/mining/spec.json, written by `mine`, read by `sidecar`), MiningError
    options      the command-line options of both commands, made from MiningSpec's and SidecarConfig's fields
    inputs       corpus + training pairs -> passages, query texts, positive and excluded rows, fingerprints
    filters      exclusions, NV-Retriever's positive-aware filter, the absolute cap, the k cut
    distributed  launcher detection and the two collectives (gather to rank 0, broadcast from it)
    job          mine(): the one code path of both modes; full and partial refreshes (RefreshPlan)
    sidecar      the loop beside the trainer (polls RUN/exports); keeps the newest --keep-versions versions

Records: every pass appends a JSON line to RUN/mining/refreshes.jsonl (version, export step, encode and
search seconds, queries, k, cache hit, full or partial refresh, passages encoded, padding fraction,
partial recall, the versions removed after it, ...). The sidecar stops on
SIGTERM/SIGINT and, with --stop-when-finished, once the trainer's RUN/run.json status is "completed" or
"failed".
The search itself lives in embedlib.search so that data_gen can reuse it, and the corpus embedding
cache in embedlib.embedding_cache, which evaluation shares.
"""
