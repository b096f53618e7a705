"""soft_ds/checkpoint.py: a save killed at any instant leaves the previous checkpoint the one
`latest` names, and --resume from it continues step for step like an uninterrupted run (the
interrupted save's folder rewritten cleanly); metadata of an unknown format is refused."""

import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, deepspeed_launch, run_cli

STEPS, SAVE_INTERVAL = 4, 2
CRASH_STEP = 4  # the second save: step 2's checkpoint is the one to resume from
PROCS = 2  # 2 pipeline stages
EXITS = [2, 4, 6, 8]


def common(data, out):
    return ["--ds_config", "ds_configs/tiny_pp2.json", "--model", "debug", "--data", data, "--seq_len", 64,
            "--micro_batch_size", 2, "--grad_accum", 1, "--train_steps", STEPS, "--warmup_steps", 1,
            "--val_size", 0, "--log_interval", 1, "--save_interval", SAVE_INTERVAL, "--output_dir", out]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """200 records of the bundled Alpaca sample: tokenizing all 5,000 would cost each launch seconds."""
    records = json.load(open(os.path.join(REPO, "data", "alpaca_5000.json")))[:200]
    path = tmp_path_factory.mktemp("data") / "alpaca_200.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    deepspeed_launch(PROCS, "soft_ds/train.py", *common(data, out))
    return out


def logged(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} in the order TensorBoard reads them back (events an interrupted
    run logged past its checkpoint are purged by the resumed run's writer), duplicates kept."""
    events = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("point", ["deepspeed", "metadata", "latest", "rename"])
def test_a_save_killed_at_any_point_resumes_exactly(uninterrupted, data, point, tmp_path):
    out = tmp_path / "run"
    crashed = deepspeed_launch(PROCS, "tests/_crash_during_save.py", f"--crash_at={point}:{CRASH_STEP}",
                               *common(data, out), check=False)
    assert crashed.returncode != 0 and f"killed at {point} of the step{CRASH_STEP} save" in crashed.stdout, \
        crashed.stdout[-2000:] + crashed.stderr[-2000:]
    checkpoints = out / "checkpoints"
    # The interrupted save left its folder behind, but `latest` still names the complete step 2.
    assert (checkpoints / f"step{CRASH_STEP}").is_dir()
    assert (checkpoints / "latest").read_text() == f"step{SAVE_INTERVAL}"

    resumed = deepspeed_launch(PROCS, "soft_ds/train.py", *common(data, out), "--resume")
    assert f"resumed from step {SAVE_INTERVAL}" in resumed.stdout

    reference, got = logged(uninterrupted), logged(out)
    for tag in ["train/loss", "train/lr"] + [f"train/exit_{n}/loss" for n in EXITS]:
        assert [step for step, _ in got[tag]] == list(range(1, STEPS + 1)), tag  # none missing, none twice
        assert got[tag] == reference[tag], tag
    assert (checkpoints / "latest").read_text() == f"step{STEPS}"
    assert json.loads((checkpoints / f"step{STEPS}" / "soft_meta.json").read_text())["step"] == STEPS
    assert not list(checkpoints.rglob("*.tmp")) and not list(out.glob(".tokenizer.tmp-*"))
    # The rewritten folder holds exactly the files of an uninterrupted save, bit-identical weights.
    final = f"checkpoints/step{STEPS}"
    assert sorted(os.listdir(out / final)) == sorted(os.listdir(uninterrupted / final))
    for name in os.listdir(uninterrupted / final):
        if name.startswith(("layer_", "shared_head")):
            x = torch.load(uninterrupted / final / name, weights_only=True)
            y = torch.load(out / final / name, weights_only=True)
            assert all(torch.equal(x[k], y[k]) for k in x), name


def saves(checkpoints) -> list[str]:
    """The checkpoint folders, `latest` and deletions in progress (DeepSpeed's own scripts aside)."""
    return sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(("step", "latest", ".deleting-")))


def test_keep_checkpoints_survives_a_kill_mid_deletion(uninterrupted, data, tmp_path):
    """keep_checkpoints 2, a save every step: killed while step 3's save deletes step 1, the run
    resumes from step 3, continues like an uninterrupted run, and ends with exactly the two newest."""
    out = tmp_path / "run"
    args = [*common(data, out), "--save-interval", 1, "--keep-checkpoints", 2]
    crashed = deepspeed_launch(PROCS, "tests/_crash_during_save.py", "--crash_at=prune:3", *args, check=False)
    assert crashed.returncode != 0 and "killed at prune of the step3 save" in crashed.stdout, \
        crashed.stdout[-2000:] + crashed.stderr[-2000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step3"
    assert saves(checkpoints) == [".deleting-step1", "latest", "step2", "step3"]

    resumed = deepspeed_launch(PROCS, "soft_ds/train.py", *args, "--resume")
    assert "resumed from step 3" in resumed.stdout and "deleted checkpoint step2 (keep_checkpoints 2)" in resumed.stdout
    assert saves(checkpoints) == ["latest", "step3", "step4"]
    reference, got = logged(uninterrupted), logged(out)
    for tag in ["train/loss", "train/lr"] + [f"train/exit_{n}/loss" for n in EXITS]:
        assert got[tag] == reference[tag], tag


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    """Only complete checkpoints (metadata written) no newer than `latest` count; an interrupted
    save's folder and `latest` itself are never deleted; a killed deletion's leftover goes."""
    from soft_ds.checkpoint import prune
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5, 6):
        (checkpoints / f"step{step}").mkdir(parents=True)
        if step not in (3, 6):  # step 3: an interrupted save; step 6: newer than latest, unfinished
            (checkpoints / f"step{step}" / "soft_meta.json").write_text("{}")
    (checkpoints / ".deleting-step0").mkdir()
    (checkpoints / "latest").write_text("step5")
    assert prune(tmp_path, 2) == ["step1", "step2"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step3", "step4", "step5", "step6"]
    assert prune(tmp_path, 1) == ["step4"] and prune(tmp_path, 1) == []


def fake_run(tmp_path, meta) -> str:
    """A run directory whose latest checkpoint holds only `meta` as its metadata."""
    step = tmp_path / "run" / "checkpoints" / "step2"
    step.mkdir(parents=True)
    (step / "soft_meta.json").write_text(json.dumps(meta))
    (step.parent / "latest").write_text("step2")
    return str(tmp_path / "run")


@pytest.mark.parametrize("version", ["older", "newer", None])
def test_other_format_versions_are_refused(tmp_path, capsys, version):
    """Metadata of any other version (an older one too) is one CheckpointError naming the version
    found and the one read, with what to do; export refuses it before writing anything."""
    from soft_ds.checkpoint import FORMAT_VERSION, read_checkpoint_meta
    from soft_ds.hf_io import CheckpointError
    meta = {"step": 2, "exits": [[2, 1.0]], "pipeline_stages": 2, "data_parallel": 1}
    if version is not None:
        meta["format_version"] = FORMAT_VERSION - 1 if version == "older" else FORMAT_VERSION + 1
    run = fake_run(tmp_path, meta)
    found = f"format_version {meta['format_version']}" if version else "no format_version"
    expected = (f"{run}/checkpoints/step2/soft_meta.json has {found}; this soft-ds reads format_version "
                f"{FORMAT_VERSION} only. Export the run with the soft-ds that saved it (soft-ds export) and train "
                f"(--model) or evaluate from the export, or start a new run")
    with pytest.raises(CheckpointError) as error:
        read_checkpoint_meta(run)
    assert str(error.value) == expected
    exported = run_cli(capsys, "export", "--run", run, "--out", tmp_path / "out")
    assert exported.returncode == 2 and exported.stderr == f"error: {expected}\n"
    assert not (tmp_path / "out").exists()


def test_resume_checks(tmp_path):
    from soft_ds.checkpoint import FORMAT_VERSION, check_resume
    from soft_ds.config import ConfigError
    from soft_ds.hf_io import CheckpointError
    run = tmp_path / "run"
    shape = {"exits": [[2, 1.0]], "pipeline_stages": 2, "data_parallel": 1}
    # An interrupted first save (a step folder, no `latest`) is no checkpoint: a fresh run may start.
    (run / "checkpoints" / "step2").mkdir(parents=True)
    check_resume(run, resume=False, shape=shape)
    run = fake_run(tmp_path / "complete", {"format_version": FORMAT_VERSION, "step": 2, **shape})
    with pytest.raises(ConfigError, match="already holds checkpoints: pass --resume"):
        check_resume(run, resume=False, shape=shape)
    check_resume(run, resume=True, shape=shape)
    with pytest.raises(ConfigError, match=r"has pipeline_stages=2, this run has 4"):
        check_resume(run, resume=True, shape={**shape, "pipeline_stages": 4})
    # The batch and the settings that decide the data order and the loss must match too; the learning
    # rate and the number of steps may change.
    from soft_ds.config import SoftOptions
    soft = SoftOptions(exits=[2], seq_len=64, train_steps=10)
    shape = {**shape, "micro_batch_size": 2, "grad_accum": 1}
    run = fake_run(tmp_path / "with_soft", {"format_version": FORMAT_VERSION, "step": 2, **shape, "soft": vars(soft)})
    check_resume(run, resume=True, shape=shape, soft=SoftOptions(exits=[2], seq_len=64, train_steps=20))
    with pytest.raises(ConfigError, match=r"has micro_batch_size=2, this run has 4"):
        check_resume(run, resume=True, shape={**shape, "micro_batch_size": 4}, soft=soft)
    for key, value in (("seq_len", 128), ("exit_schedule", "rotate"), ("seed", 7), ("packing", False)):
        changed = SoftOptions(**{**vars(soft), key: value})
        with pytest.raises(ConfigError, match=rf"has {key}=.*, this run has {value}"):
            check_resume(run, resume=True, shape=shape, soft=changed)
    # An older checkpoint (which may lack keys this version compares) is refused, not half-compared.
    old = fake_run(tmp_path / "older", {"format_version": FORMAT_VERSION - 1, "step": 2, "exits": [[2, 1.0]],
                                        "pipeline_stages": 2, "data_parallel": 1})
    with pytest.raises(CheckpointError, match=f"has format_version {FORMAT_VERSION - 1}; this soft-ds reads"):
        check_resume(old, resume=True, shape=shape, soft=soft)
