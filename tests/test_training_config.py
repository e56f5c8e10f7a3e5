"""The trainer's configuration and its errors before step 1: recipes, overrides, unknown keys, the
DeepSpeed JSON against the training config, malformed data (all without starting DeepSpeed)."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.config import ConfigError, build_ds_config, load_config
from training.main import main, rank_env_from_slurm

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "training" / "recipes" / "quickstart.yaml"
CONAN = REPO / "training" / "recipes" / "conan_finetune.yaml"


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes use paths relative to the repository root
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_quickstart_recipe_with_overrides(tmp_path):
    config = load_config(QUICKSTART, ["optim.lr=1e-5", "data.0.batch_size=8", "optim.betas=[0.9, 0.98]",
                                      f"run_dir={tmp_path}", "model.output_dim=null"])
    assert config.optim.lr == 1e-5 and isinstance(config.optim.lr, float)
    assert config.data[0].batch_size == 8 and config.optim.betas == [0.9, 0.98]
    ds = build_ds_config(config, world_size=2, has_gpu=False)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["train_batch_size"] == 16
    assert ds["bf16"]["enabled"] is False and ds["gradient_clipping"] == config.optim.grad_clip


def test_conan_recipe_parses_and_validates():
    config = load_config(CONAN)
    assert [d.kind for d in config.data] == ["retrieval", "sts", "classification"]
    assert config.model.output_dim == 1792 and config.loss.matryoshka_dims[-1] == 1792
    assert config.data[1].batch_size > config.data[0].batch_size  # STS ranks use a larger batch
    ds = build_ds_config(config, world_size=8, has_gpu=True)
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 1  # the paper trains with ZeRO-1
    assert build_ds_config(config, world_size=8, has_gpu=False)["bf16"]["enabled"] is False


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lrr=1e-5"], "unknown key 'optim.lrr' (did you mean 'lr'?)"),
    (["data.0.batchsize=8"], "unknown key 'data.0.batchsize'"),
    (["data.3.batch_size=8"], "'data.3' is not an index"),
    (["optim.lr=fast"], "'optim.lr' must be float, got 'fast'"),
    (["data.0.kind=ranking"], "unknown task kind 'ranking' for 'data.0.kind'"),
    (["train.max_steps"], "expected key=value"),
    (["negatives.rule=sometimes"], "unknown value 'sometimes' for 'negatives.rule'"),
    (["negatives.check_interval=0"], "'negatives.check_interval' must be at least 1"),
    (["evaluation.every=-1"], "'evaluation.every' must not be negative"),
])
def test_bad_overrides_are_named(overrides, expected):
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(QUICKSTART, overrides)
    assert expected in str(caught.value)


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(QUICKSTART.read_text().replace("  warmup_steps: 5", "  warmup_step: 5"))
    with pytest.raises(ConfigError) as caught:
        load_config(recipe)
    assert str(caught.value) == f"{recipe}: unknown key 'optim.warmup_step' (did you mean 'warmup_steps'?)"


@pytest.mark.parametrize("ds_patch, expected", [
    ({"train_micro_batch_size_per_gpu": 32}, "'train_micro_batch_size_per_gpu' is 32 but the training config gives 16"),
    ({"gradient_clipping": 5.0}, "'gradient_clipping' is 5.0 but the training config gives 1.0 (optim.grad_clip)"),
    ({"bf16": {"enabled": True}}, "'bf16.enabled' is true but the training config gives false"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "'optimizer.params.lr' is 0.001 but the training config gives 2e-05"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove 'scheduler'"),
])
def test_ds_config_contradicting_training_config(tmp_path, ds_patch, expected):
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds.update(ds_patch)
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    config = load_config(QUICKSTART, [f"deepspeed.config={ds_path}"])
    with pytest.raises(ConfigError) as caught:
        build_ds_config(config, world_size=2, has_gpu=False)
    assert expected in str(caught.value) and str(ds_path) in str(caught.value)


def test_ds_config_values_that_agree_are_accepted(tmp_path):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 16, "gradient_clipping": 1, "bf16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "betas": "auto"}}, "zero_optimization": {"stage": 1},
    }))
    config = load_config(QUICKSTART, [f"deepspeed.config={ds_path}"])
    ds = build_ds_config(config, world_size=4, has_gpu=False)
    assert ds["train_batch_size"] == 64 and "optimizer" not in ds  # the trainer builds the optimizer


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_errors_before_step_one_are_one_line(tmp_path, tiny_bert_dir, capsys):
    base = ["--config", str(QUICKSTART), f"run_dir={tmp_path / 'run'}", f"model.path={tiny_bert_dir}"]
    line = _one_line_error(capsys, base + ["model.path=/nonexistent/model"])
    assert "/nonexistent/model" in line and "not a model directory" in line
    line = _one_line_error(capsys, base + ["data.0.kind=ranking"])
    assert "unknown task kind 'ranking'" in line
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    line = _one_line_error(capsys, base + [f"deepspeed.config={ds}"])
    assert "'train_micro_batch_size_per_gpu' is 4 but the training config gives 16" in line
    # balanced schedule with more tasks than ranks
    sts = tmp_path / "sts.tsv"
    sts.write_text("score\tsentence1\tsentence2\n1.0\ta\tb\n2.0\tc\td\n")
    line = _one_line_error(capsys, base + ["data.1={name: sts, kind: sts, path: " + str(sts) + "}"])
    assert "at least one rank per task" in line


def test_malformed_record_stops_the_run_naming_file_line_field(tmp_path, tiny_bert_dir):
    """Run as users do (a subprocess): exit status 2 and one line naming file, line and field."""
    pairs = tmp_path / "pairs.jsonl.gz"
    with gzip.open(REPO / "data" / "scifact" / "pairs.train.jsonl.gz", "rt") as f:
        lines = [next(f) for _ in range(5)]
    record = json.loads(lines[3])
    record["pos"] = "not a list"
    lines[3] = json.dumps(record) + "\n"
    with gzip.open(pairs, "wt") as f:
        f.writelines(lines)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "training/main.py", "--config", str(QUICKSTART), f"run_dir={tmp_path / 'run'}",
         f"model.path={tiny_bert_dir}", f"data.0.path={pairs}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert err == [f"error: {pairs}:4: field 'pos': expected a list of strings, got string 'not a list'"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_ranks_from_srun_without_a_launcher():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "node01"}
    rank_env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("5", "8", "1", "29500")
    launched = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "4"}
    rank_env_from_slurm(launched)  # a launcher's variables win
    assert launched["RANK"] == "1" and launched["WORLD_SIZE"] == "4"
    with pytest.raises(ConfigError, match="export MASTER_ADDR"):
        rank_env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything loads model weights: every check must come before that."""
    from embedlib.encoder import Encoder

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(Encoder, "from_pretrained", refuse)


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=0", "'optim.lr' must be positive, got 0.0"),
    ("optim.lr=-1e-5", "'optim.lr' must be positive"),
    ("optim.lr=.nan", "'optim.lr' must be a finite number"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' must not be negative"),
    ("optim.betas=[0.9, 1.0]", "'optim.betas' must be two numbers in [0, 1)"),
    ("optim.eps=0", "'optim.eps' must be positive"),
    ("optim.warmup_steps=-1", "'optim.warmup_steps' must not be negative"),
    ("optim.grad_clip=-1", "'optim.grad_clip' must not be negative"),
    ("loss.temperature=0", "'loss.temperature' must be positive, got 0.0"),
    ("loss.temperature=.inf", "'loss.temperature' must be a finite number"),
    ("loss.cosent_scale=0", "'loss.cosent_scale' must be positive"),
    ("loss.cbb_beta=-1", "'loss.cbb_beta' must not be negative"),
    ("loss.matryoshka_dims=[0, 16]", "'loss.matryoshka_dims' must list sizes of at least 1"),
    ("loss.matryoshka_dims=[16, 16]", "'loss.matryoshka_dims' must not repeat a size"),
    ("loss.matryoshka_dims=[16, 64]", "loss.matryoshka_dims [16, 64]: each must be at most the embedding size 32"),
    ("model.max_length=1", "'model.max_length' must be at least 2"),
    ("model.output_dim=0", "'model.output_dim' must be at least 1"),
    ("data.0.weight=0", "'data.0.weight' must be positive"),
    ("data.0.neg_offset=-1", "'data.0.neg_offset' must not be negative"),
    ("data.0.batch_size=0", "'data.0.batch_size' must be at least 1"),
    ("train.keep_exports=0", "'train.keep_exports' must be at least 1"),
    ("negatives.stale_ratio=0", "'negatives.stale_ratio' must be positive"),
    ("negatives.sidecar_timeout_s=0", "'negatives.sidecar_timeout_s' must be positive"),
    ("evaluation.batch_size=0", "'evaluation.batch_size' must be at least 1"),
    ("evaluation.max_length=1", "'evaluation.max_length' must be at least 2"),
])
def test_bad_option_values_stop_before_any_model_loads(tmp_path, tiny_bert_dir, capsys, no_model_loading,
                                                       override, expected):
    run = tmp_path / "run"
    line = _one_line_error(capsys, ["--config", str(QUICKSTART), f"run_dir={run}", f"model.path={tiny_bert_dir}",
                                    override])
    assert expected in line, line
    assert not run.exists()  # nothing written


def test_empty_corpus_is_an_error_not_no_corpus(tmp_path, tiny_bert_dir, capsys, no_model_loading):
    empty = tmp_path / "corpus.jsonl"
    empty.write_text("")
    run = tmp_path / "run"
    line = _one_line_error(capsys, ["--config", str(QUICKSTART), f"run_dir={run}", f"model.path={tiny_bert_dir}",
                                    f"data.0.corpus={empty}"])
    assert line == f"error: {empty}: holds no passages; data.0.corpus must be a non-empty corpus (or leave it out)"
    assert not run.exists()


def test_evaluation_split_is_checked_before_step_one(tmp_path, tiny_bert_dir, capsys, no_model_loading):
    line = _one_line_error(capsys, ["--config", str(QUICKSTART), f"run_dir={tmp_path / 'run'}",
                                    f"model.path={tiny_bert_dir}", "evaluation.beir=data/scifact",
                                    "evaluation.split=test"])
    assert line.startswith("error: evaluation.beir: data/scifact: missing data/scifact/queries.test.jsonl"), line


def test_run_dir_that_is_a_file_is_an_error(tmp_path, tiny_bert_dir, capsys, no_model_loading):
    run = tmp_path / "run"
    run.write_text("not a directory")
    line = _one_line_error(capsys, ["--config", str(QUICKSTART), f"run_dir={run}", f"model.path={tiny_bert_dir}"])
    assert "'run_dir' must be a directory" in line


def test_an_unknown_lora_target_stops_before_anything_is_written(tmp_path, tiny_bert_dir, capsys, no_model_loading):
    run = tmp_path / "run"
    line = _one_line_error(capsys, ["--config", str(QUICKSTART), f"run_dir={run}", f"model.path={tiny_bert_dir}",
                                    "model.lora={target_modules: [query, valu]}"])
    assert line.startswith("error: model.lora.target_modules: 'valu' names no linear layer of "), line
    assert "value" in line  # the names it does have
    assert not run.exists()


@pytest.mark.parametrize("case", ["below_a_file", "a_file", "not_writable"])
def test_an_unusable_data_cache_stops_before_anything_is_written(tmp_path, tiny_bert_dir, capsys, no_model_loading,
                                                                 case):
    import os

    run, blocker = tmp_path / "run", tmp_path / "blocker"
    blocker.write_text("a file")
    where = {"below_a_file": blocker / "cache", "a_file": blocker, "not_writable": tmp_path / "ro" / "cache"}[case]
    if case == "not_writable":
        if os.geteuid() == 0:
            pytest.skip("root may write any directory")
        (tmp_path / "ro").mkdir(mode=0o555)
    line = _one_line_error(capsys, ["--config", str(QUICKSTART), f"run_dir={run}", f"model.path={tiny_bert_dir}",
                                    f"train.data_cache={where}"])
    assert line.startswith(f"error: train.data_cache '{where}'") or "train.data_cache" in line, line
    assert not run.exists()
