"""The README cannot rot: every command in it is run by a test, and every example in it is checked.

A command is a line of a ```bash block. Each must be listed in COVERAGE below with where it runs:
here (a test in this file runs it, shrunk: paths swapped for a small copy of SciFact and a tiny BERT,
or through the program's own argument and config parsers), or in another test file that runs it for
real (named with a string that file must contain, so a renamed or deleted test is noticed). A command
in the README that is not listed fails, and so does a listed command no longer in the README.

The ```json examples are read by the project's own readers; the ```python examples must name
functions and arguments that exist. Quickstart runs at full size are measured by hand (docs/RESULTS.md).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

HERE = "tests/test_readme.py"
# command (as in the README, comment removed) -> [(test file, a string that file must contain), ...]
COVERAGE: dict[str, list[tuple[str, str]]] = {
    "make demo": [("tests/test_quickstart.py", "scripts/quickstart.py"), (HERE, "def test_make_targets")],
    "make test": [(HERE, "def test_make_targets")],  # and CI runs it
    "make test-slurm": [("tests/test_slurm.py", "pytestmark = pytest.mark.slurm"), (HERE, "def test_make_targets")],
    ".venv/bin/python scripts/quickstart.py --resume": [
        ("tests/test_quickstart.py", "def test_resume_continues_the_run"), (HERE, "def test_quickstart_commands_parse")],
    ".venv/bin/python scripts/quickstart.py --max-steps 80 loss.temperature=0.05": [
        ("tests/test_quickstart.py", "def test_runs_the_whole_loop"), (HERE, "def test_quickstart_commands_parse")],
    "python -m data_gen --corpus my/corpus.jsonl --output my/generated --base-url http://localhost:8000/v1 "
    "--model Qwen/Qwen2.5-7B-Instruct": [
        ("tests/test_data_gen_resume.py", '"-m", "data_gen"'), (HERE, "def test_data_gen_command_parses")],
    "python -m mining mine --model /models/bge-base-en-v1.5 --corpus my/corpus.jsonl "
    "--queries my/generated/pairs.jsonl --run-dir runs/my-run": [(HERE, "def test_mining_and_evaluation_commands_run")],
    "python -m mining sidecar --run-dir runs/my-run": [
        ("tests/test_mining_sidecar.py", "sidecar"), ("tests/test_quickstart.py", "def test_the_sidecar_ran")],
    "deepspeed training/main.py --config training/recipes/quickstart.yaml run_dir=runs/my-run "
    "model.path=/models/bge-base-en-v1.5 data.0.path=my/generated/pairs.jsonl data.0.corpus=my/corpus.jsonl "
    "train.max_steps=2000": [("tests/test_training_runs.py", '"deepspeed"'), (HERE, "def test_trainer_commands_parse")],
    "python -m embedlib.evaluation --model runs/my-run/exports/step_00002000 --beir my --split dev": [
        (HERE, "def test_mining_and_evaluation_commands_run")],
    "python -m embedlib.evaluation --model runs/my-run/exports/step_00002000 --sts my/sts.dev.tsv": [
        (HERE, "def test_mining_and_evaluation_commands_run")],
    'make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"': [(HERE, "def test_make_targets")],
    "MINE_MODEL=/models/bge-base-en-v1.5 sbatch --nodes=2 --gpus-per-node=8 slurm/mine.sh": [
        ("tests/test_slurm.py", "mine.sh")],
    "sbatch slurm/train.sh": [("tests/test_slurm.py", "train.sh")],
    "sbatch --nodes=4 --gpus-per-node=8 slurm/train.sh optim.lr=1e-5": [("tests/test_slurm.py", "train.sh")],
    "LLM_MODEL=Qwen/Qwen2.5-7B-Instruct LLM_BASE_URL=http://node17:8000/v1 sbatch --array=0-15 slurm/data_gen.sh": [
        ("tests/test_slurm.py", "data_gen.sh")],
    "torchrun --nproc_per_node 8 training/main.py --config training/recipes/quickstart.yaml run_dir=runs/my-run": [
        ("tests/test_training_runs.py", '"torchrun"'), (HERE, "def test_trainer_commands_parse")],
    "mpiexec -n 4 python -m mining mine --model /models/bge-base-en-v1.5 --corpus my/corpus.jsonl "
    "--queries my/generated/pairs.jsonl --run-dir runs/my-run": [("tests/test_mining_distributed.py", '"mpiexec"')],
    "deepspeed training/main.py --config training/recipes/quickstart.yaml run_dir=runs/my-run data.0.batch_size=512 "
    "train.grad_cache.chunk_size=64 loss.false_negative_margin=0.1": [
        ("tests/test_grad_cache.py", "def test_resumed_run_with_the_cache_equals_straight_run"),
        (HERE, "def test_trainer_commands_parse")],
    "python -m mining sidecar --run-dir runs/my-run --full-every 5": [
        ("tests/test_mining_refresh.py", "def test_every_third_pass_is_full"), ("tests/test_mining_cli.py", '"--full-every"')],
    "python -m embedlib.report runs/my-run runs/other-run --output runs/my-run/report": [
        ("tests/test_report.py", '"-m", "embedlib.report"')],
    "python -m mining filter-pairs --model /models/bge-large-en-v1.5 --queries my/weak/pairs.jsonl "
    "--output my/weak/pairs.filtered.jsonl --min-score 0.4": [("tests/test_filter_pairs.py", '"filter-pairs"')],
    "deepspeed training/main.py --config training/recipes/conan_pretrain.yaml run_dir=runs/my-run "
    "data.0.path=my/weak/pairs.filtered.jsonl model.path=/models/base train.max_steps=100000": [
        ("tests/test_recipes.py", "conan_pretrain"), (HERE, "def test_trainer_commands_parse")],
    "deepspeed training/main.py --config training/recipes/llm_lora.yaml run_dir=runs/my-run "
    "model.path=/models/Qwen2.5-1.5B data.0.path=my/generated/pairs.jsonl data.0.corpus=my/corpus.jsonl": [
        ("tests/test_llm_training.py", "def test_llm_lora_zero3_softmask_run_resume_export_and_mining"),
        (HERE, "def test_trainer_commands_parse")],
    "make gpu-wheels": [(HERE, "def test_make_targets")],
    "make gpu-check GPU_CHECK_OUT=runs/gpu_check": [(HERE, "def test_make_targets")],
    "python -m embedlib.merge --output runs/merged runs/my-run/exports/step_00001000 runs/my-run/exports/step_00002000 "
    "runs/other-run/exports/step_00002000": [
        ("tests/test_merge.py", "def test_linear_merge_is_the_weighted_average_computed_by_hand")],
    "python -m embedlib.merge --output runs/merged-slerp --method slerp --t 0.3 runs/my-run/exports/step_00002000 "
    "runs/other-run/exports/step_00002000": [
        ("tests/test_merge.py", "def test_slerp_gives_the_endpoints_and_keeps_norms_between")],
    "python -m embedlib.merge --output runs/my-run-best3 --run runs/my-run --best-k 3 --metric eval/ndcg@10 --set scifact": [
        ("tests/test_merge.py", "def test_the_best_exports_of_a_run_by_its_eval_records")],
    "python -m embedlib.merge --output runs/my-run-greedy --run runs/my-run --greedy --sets my/dev_sets.yaml": [
        ("tests/test_merge.py", "def test_a_greedy_soup_adds_an_export_only_if_the_dev_figure_does_not_fall")],
    "python -m embedlib.merge --output runs/sweep-best3 --run runs/seed1 --run runs/seed2 --run runs/seed3 --best-k 3": [
        ("tests/test_merge.py", "def test_several_runs_are_pooled_each_export_scored_by_its_own_run")],
    ".venv/bin/python bench/gpu_check.py --dry-run --out runs/gpu_check_dry": [
        ("tests/test_gpu_check.py", "def test_dry_run_runs_every_section_on_the_cpu")],
}


# ---- reading the README ----------------------------------------------------------------------------


def code_blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S) if m.group(1) == language]


def readme_commands() -> list[str]:
    """Every command line of the ```bash blocks: continuations joined, comments and extra spaces removed."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line.strip())
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def commands_starting(prefix: str) -> list[list[str]]:
    found = [shlex.split(c) for c in readme_commands() if c.startswith(prefix)]
    assert found, f"the README has no command starting with {prefix!r}"
    return found


def test_every_readme_command_is_covered():
    commands = readme_commands()
    unknown = [c for c in commands if c not in COVERAGE]
    assert not unknown, "README commands no test runs (add them to COVERAGE in tests/test_readme.py):\n" + "\n".join(unknown)
    stale = [c for c in COVERAGE if c not in commands]
    assert not stale, "COVERAGE lists commands the README no longer has:\n" + "\n".join(stale)


def test_the_covering_tests_exist():
    missing = []
    for command, places in COVERAGE.items():
        for path, evidence in places:
            file = REPO / path
            if not file.is_file() or evidence not in file.read_text(encoding="utf-8"):
                missing.append(f"{command}\n    -> {path} does not exist or lacks {evidence!r}")
    assert not missing, "\n".join(missing)


# ---- the commands, run here ------------------------------------------------------------------------


def test_make_targets_run_what_the_readme_says():
    """`make -n` prints what a target would run without running it (the quickstart's own run is in
    tests/test_quickstart.py, the suite's is CI)."""
    def dry_run(argv: list[str], *flags: str) -> str:
        # Under `make test` this is a sub-make: drop the parent's make variables and directory lines.
        env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
        result = subprocess.run([argv[0], "-n", "--no-print-directory", *flags, *argv[1:]], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    (demo,) = commands_starting("make demo")
    assert dry_run(demo).strip().splitlines()[-1] == ".venv/bin/python scripts/quickstart.py"
    (test,) = [c for c in commands_starting("make test") if c == ["make", "test"]]
    assert dry_run(test).strip().splitlines()[-1] == '.venv/bin/python -m pytest -q -m "not slurm"'
    (slurm,) = commands_starting("make test-slurm")
    assert dry_run(slurm).strip().splitlines()[-2:] == ["slurm/testing/start_cluster.sh", ".venv/bin/python -m pytest -q -m slurm"]
    (cuda,) = [c for c in commands_starting("make test TORCH_PIP_ARGS=") if len(c) == 3]
    index = cuda[2].removeprefix("TORCH_PIP_ARGS=")
    torch_install = [line for line in dry_run(cuda, "-B").splitlines() if '"torch==' in line]
    assert torch_install and index in torch_install[0], torch_install  # -B: as if nothing were installed
    (wheels,) = commands_starting("make gpu-wheels")
    assert dry_run(wheels).strip().splitlines()[-1] == ".venv/bin/python bench/gpu_check.py --make-wheels .whl"
    (check,) = commands_starting("make gpu-check")
    assert dry_run(check).strip().splitlines()[-1] == "python3 bench/gpu_check.py --wheels .whl --out runs/gpu_check"


def _quickstart_module():
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "scripts" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_commands_parse():
    from training.config import load_config

    quickstart = _quickstart_module()
    for argv in commands_starting(".venv/bin/python scripts/quickstart.py"):
        args = quickstart.parse_args(argv[2:])
        load_config(quickstart.RECIPE, args.overrides)  # every trainer override names a real key


def test_trainer_commands_parse():
    from training.config import load_config
    from training.main import parse_args

    launches = [argv for argv in map(shlex.split, readme_commands()) if "training/main.py" in argv]
    assert {argv[0] for argv in launches} >= {"deepspeed", "torchrun"}
    for argv in launches:
        args = parse_args(argv[argv.index("training/main.py") + 1 :])
        config = load_config(REPO / args.config, args.overrides)
        assert config.run_dir == "runs/my-run"


def test_data_gen_command_parses():
    from data_gen.__main__ import parse_args

    (argv,) = commands_starting("python -m data_gen")
    args = parse_args(argv[3:])
    assert args.base_url and args.corpus == Path("my/corpus.jsonl")


def test_mining_and_evaluation_commands_run(tmp_path, tiny_bert_dir, scifact_dir, capsys):
    """The README's own-data walk-through, mining and evaluation, on a small copy of SciFact."""
    from test_quickstart import make_small_beir

    from embedlib.encoder import Encoder

    data = make_small_beir(tmp_path / "my", scifact_dir, train_pairs=16, dev_queries=8, other_docs=100)
    (data / "generated").mkdir()
    (data / "pairs.train.jsonl").rename(data / "generated" / "pairs.jsonl")
    (data / "sts.dev.tsv").write_text("score\tsentence1\tsentence2\n" + "".join(
        f"{s}\t{a}\t{b}\n" for s, a, b in [(5.0, "A man plays a guitar.", "A man plays the guitar."),
                                           (3.2, "A dog runs.", "An animal is running."),
                                           (0.4, "The sun is hot.", "He wrote a letter.")]))
    export = tmp_path / "runs" / "my-run" / "exports" / "step_00002000"
    Encoder.from_pretrained(tiny_bert_dir, max_length=32).save(export)
    where = {"/models/bge-base-en-v1.5": str(tiny_bert_dir), "runs/my-run/exports/step_00002000": str(export),
             "runs/my-run": str(tmp_path / "runs" / "my-run"), "my": str(data)}

    def run(argv: list[str], *extra: str) -> str:
        """The command in this process (its module's main, as `python -m` calls it): stdout."""
        assert argv[:2] == ["python", "-m"]
        args = [where.get(a, re.sub(r"^my/", f"{data}/", a)) for a in argv[3:]]
        capsys.readouterr()
        assert importlib.import_module(f"{argv[2]}.__main__" if argv[2] == "mining" else argv[2]).main([*args, *extra]) == 0
        return capsys.readouterr().out

    (mine,) = commands_starting("python -m mining mine")
    assert "published:" in run(mine, "--no-progress", "--k", "20")
    assert (tmp_path / "runs" / "my-run" / "negatives" / "v000001" / "manifest.json").is_file()
    (beir,) = commands_starting("python -m embedlib.evaluation --model runs/my-run/exports/step_00002000 --beir")
    retrieval = json.loads(run(beir, "--no-progress"))["retrieval"]
    assert retrieval["num_queries"] == 8 and 0 <= retrieval["ndcg@10"] <= 1
    (sts,) = commands_starting("python -m embedlib.evaluation --model runs/my-run/exports/step_00002000 --sts")
    assert json.loads(run(sts, "--no-progress"))["sts"]["num_pairs"] == 3


# ---- the examples ------------------------------------------------------------------------------------


def test_json_examples_are_read_by_the_readers(tmp_path):
    from embedlib.records import read_corpus, read_labeled_texts, read_pairs, read_queries, read_scored_pairs

    examples = [json.loads(block) for block in code_blocks("json")]
    kinds: dict[str, dict] = {}
    for example in examples:
        keys = set(example)
        kind = ("corpus" if keys == {"_id", "title", "text"} else "queries" if keys == {"_id", "text"}
                else "pairs" if "query" in keys else "sts" if "sentence1" in keys
                else "labeled" if keys == {"text", "label"} else "metrics" if "step" in keys else None)
        assert kind is not None and kind not in kinds, f"unrecognised or repeated README example: {example}"
        kinds[kind] = example
    assert set(kinds) == {"corpus", "queries", "pairs", "sts", "labeled", "metrics"}

    def write(name: str, record: dict) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(record) + "\n")
        return path

    corpus = {d.id: d for d in read_corpus(write("corpus.jsonl", kinds["corpus"]))}
    (pair,) = read_pairs(write("pairs.jsonl", kinds["pairs"]), corpus)
    assert pair.pos == [corpus[pair.pos_ids[0]].passage]
    assert read_queries(write("queries.jsonl", kinds["queries"]))[0].text == pair.query
    assert read_scored_pairs(write("sts.jsonl", kinds["sts"]))[0].score == kinds["sts"]["score"]
    assert read_labeled_texts(write("labeled.jsonl", kinds["labeled"]))[0].label == kinds["labeled"]["label"]

    # The metrics.jsonl example has exactly the keys the trainer writes (loss/<kind> per task kind).
    trainer = "".join((REPO / "training" / name).read_text(encoding="utf-8")
                      for name in ("main.py", "negatives/runtime.py", "negatives/rule.py"))
    for key in kinds["metrics"]:
        assert f'"{key.split("/")[0]}"' in trainer or f'"{key.split("/")[0]}/' in trainer, key


def test_python_examples_use_real_names():
    """Every `from embedlib... import name` exists, and every keyword it is called with is a parameter."""
    blocks = code_blocks("python")
    assert blocks
    for block in blocks:
        tree = ast.parse(block)
        imported = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("embedlib"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    imported[alias.asname or alias.name] = getattr(module, alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imported:
                parameters = inspect.signature(imported[node.func.id]).parameters
                for keyword in node.keywords:
                    assert keyword.arg in parameters, f"{node.func.id}() has no parameter {keyword.arg!r}"


def test_readme_links_and_paths_exist():
    text = README.read_text(encoding="utf-8")
    for path in ("docs/ARCHITECTURE.md", "training/recipes/quickstart.yaml", "training/recipes/conan_finetune.yaml",
                 "training/config.py", "embedlib/mteb_adapter.py", "slurm/settings.env", "scripts/quickstart.py",
                 "data/scifact"):
        assert path in text and (REPO / path).exists(), path
    assert "docs/RESULTS.md" in text  # written by the lead with the measured figures
