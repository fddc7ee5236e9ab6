"""Run folders never lose work: refuse or move aside an earlier run, one writer at a time, resume only
what would give the uninterrupted result, tidy what a kill leaves, one module for each concern."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fmpolicy.io import WriterLock, atomic_directory, atomic_write_text
from fmpolicy.run import RunLogger, open_run
from tests.helpers import load_script
from tests.test_train import CONFIG, ROOT, collect_demos, dataset, train_script  # noqa: F401 (dataset: a fixture)
from tests.test_train import TINY as TRAIN_TINY

TINY = [*TRAIN_TINY, "train.batch_size=16"]
RL_TINY = ["--config", "configs/fpo_bandit.yaml", "rl.num_envs=16", "rl.num_macro_steps=2", "rl.progress=false",
           "rl.device=cpu", "rl.save_every=1", "policy.expert.width=16", "rl.value.width=16",
           "rl.total_env_steps=64"]


def train_argv(dataset: Path, out: Path, *overrides: str) -> list[str]:
    return ["--config", CONFIG, f"data.root={dataset}", f"train.out_dir={out}", *TINY, *overrides]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (the lock file aside)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def hold_lock_in_another_process(folder: Path) -> subprocess.Popen:
    """A process that takes the folder's writer lock and keeps it until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from fmpolicy.io import WriterLock
        lock = WriterLock({str(folder)!r}, "a training run").acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


# ---- an earlier run in the folder -------------------------------------------------------------------------


def test_training_into_a_folder_that_holds_a_run_is_refused_and_the_old_run_is_untouched(dataset, tmp_path):
    out = tmp_path / "run"
    train_script.main(train_argv(dataset, out, "train.steps=4", "train.save_every=2"))
    before = snapshot(out)
    with pytest.raises(SystemExit, match=r"already holds a run .*--resume.*--overwrite"):
        train_script.main(train_argv(dataset, out, "train.steps=2", "train.save_every=1", "train.seed=1"))
    assert snapshot(out) == before


def test_overwrite_moves_the_old_run_aside_and_the_new_run_keeps_its_own_checkpoints(dataset, tmp_path):
    out = tmp_path / "run"
    # the old run ran further: its checkpoints sort after the new run's (which the old clean-up deleted)
    train_script.main(train_argv(dataset, out, "train.steps=6", "train.save_every=3", "train.keep_checkpoints=1"))
    old = snapshot(out)
    train_script.main(train_argv(dataset, out, "train.steps=2", "train.save_every=1", "train.keep_checkpoints=2",
                                 "train.log_every=1") + ["--overwrite"])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and snapshot(aside[0]) == old  # moved, never deleted
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert steps == ["step_00000001", "step_00000002"]
    last = json.loads((out / "checkpoints" / "last.json").read_text())
    assert last == {"step": 2, "path": "step_00000002"} and (out / "checkpoints" / last["path"]).is_dir()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_failed_config_check_leaves_no_folder_behind(dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"policy\.state_dim = 5 does not match the dataset"):
        train_script.main(train_argv(dataset, out, "policy.state_dim=5"))
    assert not out.exists()


# ---- two writers ---------------------------------------------------------------------------------------


def test_a_second_writer_of_a_run_folder_fails_at_once_naming_the_first(dataset, tmp_path):
    out = tmp_path / "run"
    holder = hold_lock_in_another_process(out)
    try:
        start = time.perf_counter()
        with pytest.raises(SystemExit, match=rf"in use by another writer \(pid {holder.pid}: a training run\)"):
            train_script.main(train_argv(dataset, out, "train.steps=2"))
        assert time.perf_counter() - start < 30  # at once: no training happened
        assert snapshot(out) == {}
        rl = load_script("train_fpo")
        with pytest.raises(SystemExit, match=rf"pid {holder.pid}"):
            rl.main([*RL_TINY, f"rl.out_dir={out}"])
        assert snapshot(out) == {}
    finally:
        holder.kill()
        holder.wait()
    # the kernel dropped the killed holder's lock: the folder is usable at once
    train_script.main(train_argv(dataset, out, "train.steps=2"))
    assert (out / "policy" / "model.safetensors").is_file()


def test_two_real_training_processes_one_wins_and_its_run_is_complete(dataset, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *train_argv(dataset, out, "train.steps=800")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((out / ".lock").is_file() and (out / ".lock").read_text()) and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode != 0 and f"pid {first.pid}" in second.stderr
    log = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert log == sorted(set(log)) and log[-1] == 800
    assert load_file(str(out / "policy" / "model.safetensors"))


# ---- resume ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, field", [
    ("data.num_episodes=3", "data.num_episodes: saved 0, now 3"),
    ("train.lr=0.01", "train.lr: saved 0.0003, now 0.01"),
    ("train.batch_size=8", "train.batch_size: saved 16, now 8"),
    ("train.seed=5", "train.seed: saved 0, now 5"),
    ("train.steps=8", "train.steps: saved 4, now 8"),
])
def test_resume_refuses_a_change_that_would_alter_the_result_naming_both_values(dataset, tmp_path, override, field):
    out = tmp_path / "run"
    train_script.main(train_argv(dataset, out, "train.steps=4", "train.save_every=2", "train.lr=3e-4"))
    with pytest.raises(SystemExit, match=rf"cannot resume with a different config \({field}\)"):
        train_script.main(train_argv(dataset, out, "train.steps=4", "train.save_every=2", "train.lr=3e-4", override)
                          + ["--resume"])


def test_resume_refuses_another_dataset_and_a_dataset_that_grew(dataset, tmp_path):
    out = tmp_path / "run"
    data = tmp_path / "data"
    collect_demos.main(["--env", "fmpolicy/PointObstacle-v0", "--episodes", "4", "--num-envs", "4", "--out", str(data),
                        "--seed", "3", "--no-progress"])
    common = ["train.steps=4", "train.save_every=2"]
    train_script.main(train_argv(data, out, *common))
    with pytest.raises(SystemExit, match=rf"data\.root: saved '{data}', now '{dataset}'"):
        train_script.main(train_argv(dataset, out, *common) + ["--resume"])
    collect_demos.main(["--env", "fmpolicy/PointObstacle-v0", "--episodes", "5", "--num-envs", "4", "--out", str(data),
                        "--seed", "3", "--no-progress"])
    with pytest.raises(SystemExit, match=r"the datasets changed since the checkpoint \(windows per robot: saved"):
        train_script.main(train_argv(data, out, *common) + ["--resume"])


def test_settings_that_do_not_change_the_result_may_change_on_resume_and_others_when_accepted(dataset, tmp_path):
    out = tmp_path / "run"
    train_script.main(train_argv(dataset, out, "train.steps=4", "train.save_every=2"))
    train_script.main(train_argv(dataset, out, "train.steps=4", "train.save_every=1", "train.log_every=2")
                      + ["--resume"])
    train_script.main(train_argv(dataset, out, "train.steps=6", "train.save_every=1")
                      + ["--resume", "--allow-change", "train.steps"])
    assert json.loads((out / "checkpoints" / "last.json").read_text())["step"] == 6


def test_a_killed_run_resumes_bit_for_bit_and_its_leftovers_are_tidied(dataset, tmp_path):
    """SIGKILL a real training process after a checkpoint, plant what a kill mid-write leaves, resume."""
    steps = ["train.steps=40", "train.save_every=5", "train.log_every=1", "train.keep_checkpoints=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train_script.main(train_argv(dataset, tmp_path / "full", *steps))

    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *train_argv(dataset, out, *steps)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.json"
    deadline = time.time() + 120
    while not (last.is_file() and json.loads(last.read_text())["step"] >= 10) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(last.read_text())["step"]
    assert 10 <= killed_at < 40, "the run finished before it could be killed: make it longer"
    # what a kill inside a checkpoint write leaves: a half-built directory, a temporary last.json,
    # and a complete step directory that last.json does not name yet
    (out / "checkpoints" / f".step_{killed_at + 5:08d}.x1y2.tmp").mkdir()
    (out / "checkpoints" / ".last.json.a1b2.tmp").write_text("{")
    (out / "checkpoints" / f".step_{killed_at:08d}.k3j4").mkdir()  # the names of earlier versions
    (out / "checkpoints" / ".last.json.q9w8").write_text("{")
    (out / "checkpoints" / f"step_{killed_at + 5:08d}").mkdir()
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 39, "loss": 0.1')  # a line cut short

    train_script.main(train_argv(dataset, out, *steps) + ["--resume"])
    full, resumed = (load_file(str(p / "policy" / "model.safetensors")) for p in (tmp_path / "full", out))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.json", "step_00000035", "step_00000040"]
    log = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 41))


def test_rl_resume_refuses_a_changed_setting_and_a_run_in_the_way(tmp_path):
    rl = load_script("train_fpo")
    out = tmp_path / "rl"
    rl.main([*RL_TINY, f"rl.out_dir={out}"])
    before = snapshot(out)
    with pytest.raises(SystemExit, match="already holds a run"):
        rl.main([*RL_TINY, f"rl.out_dir={out}"])
    with pytest.raises(SystemExit, match=r"rl\.clip: saved 0\.\d+, now 0\.5"):
        rl.main([*RL_TINY, f"rl.out_dir={out}", "rl.clip=0.5", "--resume"])
    assert snapshot(out) == before


# ---- the pieces --------------------------------------------------------------------------------------------


def test_the_log_drops_lines_past_the_resumed_step_and_a_cut_line(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    logger = RunLogger(tmp_path, start_step=2)
    logger.log(3, {"loss": 0.5})
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [
        {"step": 1}, {"step": 2}, {"step": 3, "loss": 0.5}]


def test_an_atomic_directory_that_fails_leaves_the_old_one_whole(tmp_path):
    target = tmp_path / "policy"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("half of the new")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "a: 1\n")

    def broken(f):
        f.write(b"a: ")
        raise OSError("disk full")

    from fmpolicy.io import atomic_write
    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_text() == "a: 1\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_the_lock_is_released_when_the_writer_ends_with_an_error(tmp_path):
    with pytest.raises(ValueError), open_run(tmp_path / "run", resume=False):
        raise ValueError("a crash inside the run")
    with WriterLock(tmp_path / "run", "a check"):  # would raise LockError if still held
        pass


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_rl_and_training_do_not_import_each_other_and_share_the_run_bookkeeping():
    pkg = ROOT / "fmpolicy"
    for path in (pkg / "rl").glob("*.py"):
        assert not {m for m in _imports(path) if m.startswith("fmpolicy.training")}, path
    for path in (pkg / "training").glob("*.py"):
        assert not {m for m in _imports(path) if m.startswith("fmpolicy.rl")}, path
    for trainer in (pkg / "rl" / "trainer.py", pkg / "training" / "imitation.py"):
        assert "fmpolicy.run" in _imports(trainer), trainer


def test_only_the_io_module_renames_files_into_place():
    """One implementation of atomic writes: no other module calls os.replace / os.rename / mkstemp."""
    offenders = []
    for path in (ROOT / "fmpolicy").rglob("*.py"):
        if path.name == "io.py" or path.parent.name == "run" and path.name == "folder.py":
            continue  # folder.py renames a whole run aside (--overwrite): a move, not a write
        text = path.read_text()
        if any(call in text for call in ("os.replace(", "os.rename(", "mkstemp(", "mkdtemp(")):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_every_package_of_the_source_tree_is_in_the_wheel_list():
    """pyproject lists packages one by one: a new subpackage missing there works in an editable install
    (the tests) and is missing from a real one."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fmpolicy").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


def test_a_run_saved_before_a_config_field_existed_resumes_with_its_default(tmp_path):
    """An older fmpolicy wrote config.yaml without fields added since: they count as their defaults."""
    import yaml

    rl = load_script("train_fpo")
    out = tmp_path / "rl"
    rl.main([*RL_TINY, f"rl.out_dir={out}", "rl.total_env_steps=32"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["rl"]["adam_eps"], saved["policy"]["expert"]["time_input"]  # what an older version lacked
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    result = rl.main([*RL_TINY, f"rl.out_dir={out}", "--resume"])
    assert result.history[-1]["iteration"] == 2
    saved["rl"]["clip"] = 0.3  # a real difference is still refused
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(SystemExit, match=r"rl\.clip: saved 0\.3"):
        rl.main([*RL_TINY, f"rl.out_dir={out}", "rl.total_env_steps=96", "--resume"])


def test_scripts_load_each_other_without_touching_sys_path():
    import sys
    from pathlib import Path

    from fmpolicy.scripting import load_script

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    before = list(sys.path)
    pipeline = load_script("pipeline", scripts)
    assert sys.path == before and callable(pipeline.main) and callable(pipeline.train.main)
    assert "train" not in sys.modules or not hasattr(sys.modules["train"], "main")  # nothing shadows a name
    for name in ("bandit_modes", "finetune_experiment"):
        assert "sys.path" not in (scripts / f"{name}.py").read_text()
    with pytest.raises(FileNotFoundError, match="no script 'nope'"):
        load_script("nope", scripts)
