"""What do ZeRO-3 with zero.Init and LoRA buy on an LLM backbone? Peak resident memory per rank while
loading and while training, and seconds per step, on CPU ranks (2 by default) with a random Qwen2-shaped model.

    .venv/bin/python bench/bench_llm.py [--configs zero2-full zero3-full zero2-lora zero3-lora plain-lora]
        [--layers 24 --hidden 896 --intermediate 4864 --heads 14 --kv-heads 2 --vocab 151936]
        [--ranks 2] [--batch 2 --negatives 1 --max-length 64 --steps 3] [--gradient-checkpointing] [--safety-gb 9]
        [--zero3-config ds_configs/zero3.json] [--json out.json]

The default shape is Qwen2.5-0.5B's (about 494M parameters, tied embeddings), random weights written once
as sharded safetensors into a temporary directory (nothing is downloaded). Every configuration runs in
--ranks fresh ranks (torch.multiprocessing, gloo, 1 thread each), so each rank's peak resident set (VmHWM in
/proc/self/status: the whole process since its exec; not getrusage's ru_maxrss, which a spawned process
inherits from its parent at the fork, here the gigabytes of the process that wrote the model) belongs to
that configuration alone:

    zero2-full / zero3-full   the trainer's build_engine and train_step (training/main.py) with the
    zero2-lora / zero3-lora   llm_lora recipe: full fine-tuning or LoRA (r 16, attention and MLP), ZeRO-2
                              (every rank loads the whole model) or ZeRO-3 (loaded inside zero.Init)
    plain-lora                the same Encoder with the same peft adapters, no DeepSpeed: forward, the
                              same CBB loss, backward, gradients averaged with all_reduce, clipping, AdamW

Each rank trains on its own batch of --batch queries, each with a positive and --negatives negatives
(random token ids, --max-length tokens each), softmask attention, fp32. A step's time is the slower rank's;
the median over --steps steps after one untimed step. A rank whose resident set passes --safety-gb is
stopped and recorded as such, to keep a shared machine alive.

Where a peak comes from: each row's phases_by_rank holds every rank's largest resident set in each phase
(load: the Encoder built and loaded; ds_initialize: deepspeed.initialize; forward_backward and
optimizer_step: the two halves of every step), split into anonymous memory and file pages (a loader's
mapped safetensors count in the resident set too). The resident set also holds memory that glibc malloc
keeps after it was freed; ZeRO-3 frees and re-allocates every gathered parameter at each use, so to see
what is live rather than what the allocator kept, run with MALLOC_MMAP_THRESHOLD_=65536 in the
environment (every allocation of 64 KiB or more is then returned to the system when freed).

Aims (issue 16): ZeRO-3 + zero.Init peak per rank <= 0.6 x ZeRO-2's; LoRA step <= 1.1 x the plain loop's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

CONFIGS = ("zero2-full", "zero3-full", "zero2-lora", "zero3-lora", "plain-lora")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--ranks", type=int, default=2, help="processes (ZeRO-3 holds 1/ranks of the weights on each)")
    p.add_argument("--batch", type=int, default=2, help="queries per rank")
    p.add_argument("--negatives", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one untimed step")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="as the llm_lora recipe trains; in every configuration, the plain loop's encoder included")
    p.add_argument("--safety-gb", type=float, default=9.0, help="stop a rank whose resident set passes this")
    p.add_argument("--zero3-config", default="ds_configs/zero3.json", help="DeepSpeed JSON of the zero3-* runs")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_llm_") as tmp:
        started = time.perf_counter()
        model_dir, parameters = write_model(Path(tmp) / "model", args)
        print(f"random Qwen2 model: {parameters / 1e6:.0f}M parameters, written in "
              f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
        rows = []
        for name in args.configs:
            row = run_config(args, name, model_dir, Path(tmp))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    report = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "parameters": parameters, "rows": rows, "aims": aims(rows)}
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def write_model(directory: Path, args) -> tuple[Path, int]:
    """A random Qwen2ForCausalLM of the given shape, sharded safetensors, with a small word-level
    tokenizer (eos <|endoftext|>, also the pad token) whose ids are a prefix of the vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = ["<unk>", "<|endoftext|>"] + [f"w{i}" for i in range(1000)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(directory)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=4096, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size="500MB")
    del model
    return directory, parameters


def run_config(args, name: str, model_dir: Path, tmp: Path) -> dict:
    import torch.multiprocessing as mp

    out = Path(tempfile.mkdtemp(dir=tmp))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.start_processes(rank_main, args=(port, name, str(model_dir), vars(args), str(out)), nprocs=args.ranks,
                           start_method="spawn")
        status = "ok"
    except mp.ProcessExitedException as error:
        status = f"failed: {error}"
    stopped = [json.loads(f.read_text()) for f in out.glob("stopped*.json")]
    row = {"config": name, "status": f"stopped above {args.safety_gb} GB" if stopped else status}
    reports = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    if len(reports) == args.ranks:
        row.update(load_s=round(max(r["load_s"] for r in reports), 1),
                   peak_rss_load_gb=round(max(r["peak_rss_load_gb"] for r in reports), 3),
                   peak_rss_train_gb=round(max(r["peak_rss_train_gb"] for r in reports), 3),
                   s_per_step=round(statistics.median(reports[0]["step_times"]), 2),
                   step_times=[round(t, 2) for t in reports[0]["step_times"]], trainable=reports[0]["trainable"],
                   loss=reports[0]["loss"], phases_by_rank=[r["phases"] for r in reports])
    elif stopped:  # the phase it was stopped in is the last one in its report
        row.update(peak_rss_gb=max(s["rss_gb"] for s in stopped), phases_by_rank=[s.get("phases") for s in stopped])
    return row


def rank_main(rank: int, port: int, name: str, model_dir: str, args: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args["ranks"]),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")

    phases = Phases()

    def watchdog() -> None:  # keeps a configuration far over the cap from taking the machine down
        while True:
            now = phases.sample()
            if now > args["safety_gb"]:
                Path(out, f"stopped{rank}.json").write_text(json.dumps({"rss_gb": round(now, 3),
                                                                        "phases": phases.report()}))
                os._exit(3)
            time.sleep(0.01)

    threading.Thread(target=watchdog, daemon=True).start()
    import torch

    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger

    from embedlib.logs import route_logs
    from training.config import build_ds_config, check_model, load_config
    from training.grad_cache import backward_step
    from training.main import build_engine, load_encoder, set_attention

    logger.setLevel("ERROR")
    route_logs(console_level=40)
    deepspeed.init_distributed(dist_backend="gloo")
    stage, tuning = name.split("-")
    overrides = [f"run_dir={tempfile.mkdtemp(dir=out)}", f"model.path={model_dir}",
                 f"model.max_length={args['max_length']}", f"data.0.batch_size={args['batch']}",
                 f"data.0.num_negatives={args['negatives']}", "train.num_workers=0", "train.grad_cache.chunk_size=null",
                 f"model.gradient_checkpointing={str(args['gradient_checkpointing']).lower()}", "train.precision=fp32",
                 f"deepspeed.config={args['zero3_config'] if stage == 'zero3' else 'ds_configs/zero2.json'}"]
    if tuning == "full":
        overrides.append("model.lora=null")
    os.chdir(REPO)
    config = load_config(REPO / "training" / "recipes" / "llm_lora.yaml", overrides)
    path = check_model(config)
    world = args["ranks"]
    kinds = ["retrieval"] * world

    dist.barrier()
    started = time.perf_counter()
    phases.enter("load")
    if stage == "plain":
        encoder = load_encoder(config.model, path, {}, config.seed)
        encoder.device = torch.device("cpu")  # grad_cache.forward moves inputs to `.device`
        step = plain_step(encoder, config, phases, world)
    else:
        initialize = deepspeed.initialize

        def timed_initialize(*a, **k):  # the engine's own allocations, apart from the model's
            phases.enter("ds_initialize")
            return initialize(*a, **k)

        deepspeed.initialize = timed_initialize
        ds_config = build_ds_config(config, world, has_gpu=False)
        engine = build_engine(config, path, ds_config)
        deepspeed.initialize = initialize
        encoder = engine.module

        def step(batch) -> float:  # train_step's two halves, each its own phase
            phases.enter("forward_backward")
            out = backward_step(engine, batch, kinds, config.loss)
            phases.enter("optimizer_step")
            engine.step()
            return out.value
    load_s = time.perf_counter() - started
    peak_load = peak_rss_gb()
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                    for p in encoder.parameters() if p.requires_grad)

    batch = make_batch(rank, args)
    times, loss = [], None
    for i in range(args["steps"] + 1):
        set_attention(encoder, config.model, i)
        dist.barrier()
        t0 = time.perf_counter()
        loss = step(batch)
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slower rank
        if i > 0:
            times.append(elapsed.item())
    phases.enter("done")
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"load_s": load_s, "peak_rss_load_gb": peak_load, "peak_rss_train_gb": peak_rss_gb(), "step_times": times,
         "trainable": trainable, "loss": loss, "phases": phases.report(),
         **({"ds_zero": {k: v for k, v in ds_config["zero_optimization"].items()}} if stage != "plain" else {})}))
    dist.barrier()
    dist.destroy_process_group()


def plain_step(encoder, config, phases, world: int):
    """The loop a user would write with torch and peft alone: the same forwards and loss as the trainer,
    gradients averaged over ranks with one all_reduce each, clipping, AdamW with the same LR schedule (so
    its losses match the DeepSpeed LoRA runs')."""
    import torch
    import torch.distributed as dist

    from training.grad_cache import embed
    from training.loss import cbb_step_loss
    from training.lora import trainable_parameter_groups
    from training.main import lr_factor

    o = config.optim
    optimizer = torch.optim.AdamW(trainable_parameter_groups(encoder, o.weight_decay), lr=o.lr,
                                  betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))  # the trainer's schedule
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    encoder.train()

    def step(batch) -> float:
        phases.enter("forward_backward")
        out = cbb_step_loss(embed(encoder, batch, config.loss), ["retrieval"] * world, config.loss, world)
        out.loss.backward()
        phases.enter("optimizer_step")
        for p in trainable:
            dist.all_reduce(p.grad)
            p.grad /= world
        torch.nn.utils.clip_grad_norm_(trainable, o.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return out.value

    return step


def make_batch(rank: int, args: dict):
    """This rank's RetrievalBatch: random token ids of the tokenizer's words, eos last, no padding."""
    import torch

    from training.data import RetrievalBatch

    generator = torch.Generator().manual_seed(100 + rank)
    n, q, length = args["negatives"], args["batch"], args["max_length"]

    def texts(count: int) -> dict:
        ids = torch.randint(2, 1002, (count, length), generator=generator)
        ids[:, -1] = 1  # <|endoftext|>
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return RetrievalBatch(step=0, task="data", assignment=("data",) * args["ranks"], cursors_after=[], query=texts(q),
                          passages=texts(q + q * n), num_negatives=n, rows=tuple(range(q)), negatives=None)


class Phases:
    """The largest resident set seen in each phase of a rank's life (load, ds_initialize, forward_backward,
    optimizer_step), sampled by the watchdog thread every 10 ms, with its split into anonymous memory
    and file pages (the safetensors files a loader maps count in the resident set too). VmHWM only
    says the overall peak; this says where it is."""

    def __init__(self):
        self.current = "start"
        self.peaks: dict[str, dict] = {}
        self.lock = threading.Lock()

    def enter(self, name: str) -> None:
        self.sample()  # the end of the phase before
        with self.lock:
            self.current = name
        self.sample()

    def sample(self) -> float:
        anon, file = rss_split_gb()
        with self.lock:
            peak = self.peaks.setdefault(self.current, {"rss_gb": 0.0})
            if anon + file > peak["rss_gb"]:
                peak.update(rss_gb=round(anon + file, 3), anon_gb=round(anon, 3), file_gb=round(file, 3))
        return anon + file

    def report(self) -> dict:
        with self.lock:
            return {name: dict(peak) for name, peak in self.peaks.items()}


def rss_split_gb() -> tuple[float, float]:
    """(anonymous, file-backed + shared memory) resident GB of this process, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                name, value = line.split(":")
                fields[name] = int(value.split()[0]) / 2**20  # kB
    return fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0) + fields.get("RssShmem", 0.0)


def peak_rss_gb() -> float:
    with open("/proc/self/status") as f:  # the peak of this process's own memory map, reset by exec
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # kB


def aims(rows: list[dict]) -> dict:
    by = {r["config"]: r for r in rows if "s_per_step" in r}
    found = {}
    for tuning in ("full", "lora"):
        if f"zero2-{tuning}" in by and f"zero3-{tuning}" in by:
            found[f"zero3_over_zero2_peak_{tuning}"] = round(
                by[f"zero3-{tuning}"]["peak_rss_train_gb"] / by[f"zero2-{tuning}"]["peak_rss_train_gb"], 3)
    for stage in ("zero2", "zero3"):
        if f"{stage}-lora" in by and "plain-lora" in by:
            found[f"{stage}_lora_over_plain_step"] = round(
                by[f"{stage}-lora"]["s_per_step"] / by["plain-lora"]["s_per_step"], 3)
    return found


def print_table(report: dict) -> None:
    print(f"{'config':<12} {'status':<10} {'load s':>7} {'peak load GB':>13} {'peak train GB':>14} "
          f"{'s/step':>7} {'trainable':>12}")
    for r in report["rows"]:
        print(f"{r['config']:<12} {r['status'][:10]:<10} {r.get('load_s', ''):>7} {r.get('peak_rss_load_gb', ''):>13} "
              f"{r.get('peak_rss_train_gb', r.get('peak_rss_gb', '')):>14} {r.get('s_per_step', ''):>7} "
              f"{r.get('trainable', ''):>12}")
    for key, value in report["aims"].items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
