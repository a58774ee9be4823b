"""Config probes: every bad value is refused at composition time, before any file or model exists.

Each probe composes the real ``conf/`` with one bad override and runs the checks the command
line runs before Hydra creates the run directory (:func:`comalkit.app.check_config`); it
asserts exit code 2 and one line naming the key. docs/reliability.md lists the outcomes.
"""

from __future__ import annotations

import logging

import pytest
from hydra.errors import ConfigCompositionException
from probe import TINY_OFFLINE, TINY_ONLINE, assert_one_line, cli, config_failure, failure

from comalkit.app import check_config
from comalkit.testing import compose

OFFLINE = ["experiment=offline", "model=tiny"]

#: (overrides, text the one-line message must contain)
REFUSED = [
    # ranges
    (["trainer.lr=-1"], "trainer.lr=-1"),
    (["trainer.lr=0"], "trainer.lr=0"),
    (["trainer.batch_size=0"], "trainer.batch_size=0"),
    (["trainer.max_epochs=0"], "trainer.max_epochs=0"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
    (["trainer.gradient_clip_val=0"], "trainer.gradient_clip_val=0"),
    (["trainer.scheduler.warmup_ratio=1.5"], "trainer.scheduler.warmup_ratio=1.5"),
    (["trainer.scheduler.warmup_steps=-3"], "trainer.scheduler.warmup_steps=-3"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["trainer.devices=-2"], "trainer.devices=-2"),
    (["trainer.num_nodes=0"], "trainer.num_nodes=0"),
    (["task.temperature=0"], "task.temperature=0"),
    (["task.top_p=1.5"], "task.top_p=1.5"),
    (["task.iterations=0"], "task.iterations=0"),
    (["task.samples_per_prompt=1"], "task.samples_per_prompt=1"),
    (["reference=ema", "reference.alpha=2"], "reference.alpha=2"),
    (["model.lora.r=0"], "model.lora.r=0"),
    (["model.lora.dropout=1.0"], "model.lora.dropout=1.0"),
    (["data.split_size=0"], "data.split_size=0"),
    # non-finite numbers, in every group and inside lists
    (["trainer.lr=inf"], "trainer.lr=inf"),
    (["trainer.lr=nan"], "trainer.lr=nan"),
    (["solver.beta=inf"], "solver.beta=inf"),
    (["solver.beta=nan"], "solver.beta=nan"),
    (["task.temperature=inf"], "task.temperature=inf"),
    (["task.top_p=nan"], "task.top_p=nan"),
    (["model.lora.alpha=inf"], "model.lora.alpha=inf"),
    (["reference.strengths=[0.1,inf]"], "reference.strengths[1]=inf"),
    (["trainer.optimizer.weight_decay=nan"], "trainer.optimizer.weight_decay=nan"),
    (["seed=nan"], "seed=nan"),
    # choices
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu'"),
    (["trainer.precision=bf17"], "trainer.precision='bf17'"),
    (["trainer.scheduler.name=step"], "trainer.scheduler.name='step'"),
    (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite='ignore'"),
    (["trainer.optimizer._target_=os.system"], "trainer.optimizer._target_='os.system'"),
    (["model.truncation=cut"], "model.truncation='cut'"),
    (["model.dtype=int8"], "model.dtype='int8'"),
    (["logger=wandb", "logger.mode=loud"], "logger.mode='loud'"),
    # unknown keys
    (["+foo=bar"], "unknown top-level key 'foo'"),
    (["+trainer.lrr=1"], "trainer.lrr: unknown key"),
    # resources this machine does not have (CPU-only CI)
    (["trainer.accelerator=gpu"], "trainer.accelerator=gpu but no CUDA device"),
    (["model.device=cuda"], "model.device=cuda but no CUDA device"),
    (["experiment=synthetic", "task.device=cuda"], "task.device=cuda but no CUDA device"),
    # missing values
    (["data=prompts"], "data.path has no value"),
    # the task's checks on the plugins it would build (Task.check), before the run directory
    (["solver=extragradient"], "exact games only"),
    (["solver=sppo", "pairs=best_vs_worst"], "needs per-response win probabilities"),
    (["reference.strengths=[-1]"], "reference.strengths"),
    (["data.split_size=100000"], "split_size=100000"),
    (["experiment=offline", "solver=extragradient"], "exact games only"),
    (["oracle.scorers=[]"], "oracle.scorers is empty"),
    (["oracle=http_judge", "oracle.base_url=notaurl"], "oracle.base_url='notaurl'"),
    (["oracle=rule", "oracle.kind=keyword"], "oracle.keywords is empty"),
    (["experiment=evaluate"], "evaluation needs at least two contestants"),
    (["model.lora.target_modules=[q_proj,qproj]"], "'qproj' names no module of this llama model"),
    # files named in the config that do not exist
    (["oracle.judge=/nonexistent/judge.gguf"], "oracle judge '/nonexistent/judge.gguf'"),
    (["oracle=reward_model", "oracle.judge=/nonexistent/dir"], "oracle judge '/nonexistent/dir'"),
]


@pytest.mark.parametrize(("overrides", "needle"), REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_bad_value_is_refused_before_any_file(overrides, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may appear here (outputs/ is relative to the working directory)
    code, stderr = config_failure(["model=tiny", *overrides])
    assert code == 2
    assert_one_line(stderr, "config error", needle)
    assert list(tmp_path.iterdir()) == [], "a refused config wrote a file"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model=hf"], "model=hf needs model.path"),
        (["model=hf", "model.path=/nope"], "model.path='/nope'"),
        (["model=hf", "model.path={text}"], "is a file but not a .gguf file"),
    ],
)
def test_a_model_without_its_files_is_refused_before_any_file(
    overrides, needle, tmp_path, tmp_path_factory, monkeypatch
):
    text = tmp_path_factory.mktemp("not-a-model") / "notes.txt"  # outside tmp_path, which must stay empty
    text.write_text("not a model")
    overrides = [o.format(text=text) for o in overrides]
    monkeypatch.chdir(tmp_path)
    code, stderr = config_failure(overrides)
    assert code == 2
    assert_one_line(stderr, "config error", needle)
    assert list(tmp_path.iterdir()) == [], "a refused config wrote a file"


def _gpt2_dir(path):
    """A tiny local GPT-2 directory: its attention is ``c_attn``, not the default q/k/v/o."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        path
    )
    return path


def test_lora_targets_are_checked_against_a_local_model_before_any_file(tmp_path, monkeypatch):
    model = _gpt2_dir(tmp_path.parent / f"{tmp_path.name}-gpt2")
    monkeypatch.chdir(tmp_path)
    code, stderr = config_failure(["model=hf", f"model.path={model}"])
    assert code == 2
    assert_one_line(stderr, "config error", "'q_proj', 'k_proj', 'v_proj', 'o_proj' name no module", "c_attn")
    assert list(tmp_path.iterdir()) == [], "a refused config wrote a file"
    for targets in ("[c_attn]", "[all-linear]"):
        check_config(compose(["model=hf", f"model.path={model}", f"model.lora.target_modules={targets}"]))
    check_config(compose(["model=hf", f"model.path={model}", "model.lora.enabled=false"]))


@pytest.mark.slow
def test_lora_targets_of_the_bundled_model_are_checked_at_composition():
    code, stderr = config_failure(["model=smollm2", "model.lora.target_modules=[q_proj,gate]"])
    assert code == 2
    assert_one_line(stderr, "'gate' names no module of this llama model", "gate_proj")
    check_config(compose(["model=smollm2", "model.lora.target_modules=[q_proj,gate_proj]"]))


#: wrong types and unknown plugin keys: Hydra refuses them while composing, naming the key
COMPOSE_ERRORS = [
    (["task.iterations=abc"], "task.iterations"),
    (["task.iterations=1e8"], "task.iterations"),
    (["solver.beta=high"], "solver.beta"),
    (["model.lora.r=1.5"], "model.lora.r"),
    (["reference.no_such_key=1"], "no_such_key"),
    (["model.lora.enable=false"], "enable"),
    (["task.logp_batch_size=16"], "logp_batch_size"),  # one name: trainer.logps_batch_size
]


@pytest.mark.parametrize(
    ("overrides", "needle"), COMPOSE_ERRORS, ids=[" ".join(o) for o, _ in COMPOSE_ERRORS]
)
def test_wrong_type_or_unknown_key_fails_while_composing(overrides, needle):
    with pytest.raises(ConfigCompositionException) as info:
        compose(overrides)
    text = f"{info.value} {info.value.__cause__}"
    assert needle in text


def test_wrong_type_on_the_command_line_exits_2_without_a_traceback(tmp_path):
    out = cli("experiment=synthetic", "task.iterations=abc", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr
    assert "task.iterations" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_a_task_check_on_the_command_line_exits_2_before_the_run_directory(tmp_path):
    out = cli("model=tiny", "solver=extragradient", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr
    assert "exact games only" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


def test_untyped_trainer_value_is_refused_naming_the_key():
    code, stderr = config_failure([*OFFLINE, "trainer.lr=abc"])
    assert code == 2
    assert_one_line(stderr, "lr")


#: refused when the task starts, before any model loads or any stage file is written
TASK_ERRORS = [
    (["solver=extragradient"], "exact games only"),
    (["solver=sppo", "pairs=best_vs_worst"], "win"),
    (["data.split_size=100000"], "split_size=100000"),
    (["reference.strengths=[-1]"], "reference.strengths"),
    (["model.max_prompt_length=600"], "max_prompt_length=600"),
]


@pytest.mark.parametrize(("overrides", "needle"), TASK_ERRORS, ids=[" ".join(o) for o, _ in TASK_ERRORS])
def test_conflicting_choices_fail_before_any_stage(overrides, needle, tmp_path):
    code, stderr = failure([*TINY_ONLINE, *overrides], tmp_path / "run")
    assert code == 2
    assert_one_line(stderr, needle)
    assert not (tmp_path / "run" / "iterations").exists()
    assert not (tmp_path / "run" / "oracle_cache.sqlite").exists()


def test_game_only_solver_offline_fails_before_training(tmp_path):
    code, stderr = failure([*TINY_OFFLINE, "solver=extragradient"], tmp_path / "run")
    assert code == 2
    assert_one_line(stderr, "exact games only")


#: settings another setting overrides: the run goes on, with a warning that says so
WARNED = [
    (["reference.strengths=[0.5]", "solver.beta=0.3"], "overriding solver.beta=0.3"),
    (["model.lora.enabled=false", "model.lora.r=4"], "model.lora.r set but model.lora.enabled=false"),
]


@pytest.mark.parametrize(("overrides", "needle"), WARNED, ids=[" ".join(o) for o, _ in WARNED])
def test_overridden_setting_is_warned(overrides, needle, caplog):
    with caplog.at_level(logging.WARNING, logger="comalkit"):
        check_config(compose(["model=tiny", *overrides]))
    assert any(needle in r.getMessage() for r in caplog.records), caplog.text


def test_defaults_give_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="comalkit"):
        check_config(compose(["model=tiny"]))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
