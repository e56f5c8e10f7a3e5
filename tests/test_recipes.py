"""Every recipe in training/recipes parses and validates; the pre-training recipe is the paper's stage 1
(weak pairs, in-batch negatives only, large batches through the gradient cache) on the bundled data."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.config import build_ds_config, load_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "training" / "recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes use paths relative to the repository root
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_the_recipes_are_all_here():
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "quickstart_grad_cache.yaml", "conan_finetune.yaml",
                                         "conan_pretrain.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_validates(recipe):
    config = load_config(recipe)
    assert config.data and build_ds_config(config, world_size=2, has_gpu=False)


def test_pretrain_recipe_is_in_batch_large_batch_on_bundled_data(tmp_path):
    from training.data import load_tasks

    config = load_config(REPO / "training" / "recipes" / "conan_pretrain.yaml", [f"run_dir={tmp_path}"])
    (weak,) = config.data
    assert weak.kind == "retrieval" and weak.num_negatives == 0 and weak.corpus is None
    assert weak.batch_size >= 256 and config.train.grad_cache.chunk_size < weak.batch_size
    assert (REPO / weak.path).is_file()  # the bundled data: runnable as shipped
    (task,) = load_tasks(config)  # every record checked, through the data cache
    assert task.num_negatives == 0 and task.store is None and len(task) >= 2 * weak.batch_size
