"""The data cache under the real trainer (torchrun, 2 CPU ranks over gloo, tiny BERT): a resume whose
data cache was deleted converts again and computes the same losses as a straight run, and a resume on
changed data stops with one line naming the data set."""
from __future__ import annotations

import gzip
import shutil
import subprocess

import pytest

from test_training_runs import REPO, _command, _env, _losses, _run


@pytest.mark.slow
def test_resume_after_the_data_cache_was_deleted_and_on_changed_data(tmp_path, tiny_bert_dir):
    pairs = tmp_path / "pairs.jsonl"
    with gzip.open(REPO / "data" / "scifact" / "pairs.train.jsonl.gz", "rt") as f:
        pairs.write_text(f.read())
    data = [f"data.0.path={pairs}", "deepspeed.config=ds_configs/zero2.json"]
    straight = tmp_path / "straight"
    _run("torchrun", straight, tiny_bert_dir, data + ["train.max_steps=4"])
    assert (straight / "data_cache").is_dir()

    resumed = tmp_path / "resumed"
    _run("torchrun", resumed, tiny_bert_dir, data + ["train.max_steps=2"])
    shutil.rmtree(resumed / "data_cache")
    _run("torchrun", resumed, tiny_bert_dir, data + ["train.max_steps=4"], resume=True)
    assert (resumed / "data_cache").is_dir()  # converted again
    assert _losses(resumed) == _losses(straight)  # exactly: the same rows, the same batches

    # The pairs file changes after the checkpoint at step 4: the resume refuses it rather than train on a mix.
    pairs.write_text(pairs.read_text().replace('"query": "', '"query": "changed ', 1))
    result = subprocess.run(_command("torchrun", resumed, tiny_bert_dir, data + ["train.max_steps=6"], resume=True),
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: data set 'scifact' (data.0) is not the data the checkpoint was trained on: its records "
                      "or its row count changed since; resume with that data, or start a new run_dir"], result.stderr[-3000:]
    assert _losses(resumed) == _losses(straight)  # nothing trained on the changed data
