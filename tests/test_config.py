"""soft_ds.config: shipped configs load; strictness; the derived DeepSpeed batch numbers and schedule."""

import copy
import glob
import json
import math
import os
from pathlib import Path

import pytest

from conftest import REPO
from soft_ds.config import ConfigError, RunConfig, SoftOptions, load_config, override

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.json"))

BASE = {
    "train_micro_batch_size_per_gpu": 3,
    "gradient_accumulation_steps": 5,
    "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.95]}},
    "gradient_clipping": 1.0,
    "bf16": {"enabled": False},
    "soft": {"pipeline_stages": 2, "train_steps": 10, "warmup_steps": 2, "min_lr_ratio": 0.1},
}


def write(tmp_path, data, name="run.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def base(**changes) -> dict:
    data = copy.deepcopy(BASE)
    data.update(changes)
    return data


@pytest.mark.parametrize("path", SHIPPED or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"no shipped configs in {CONFIG_DIR} yet"))], ids=lambda p: p.name if p else "none")
def test_shipped_config_loads(path):
    config = load_config(str(path))
    ds = config.deepspeed_config(world_size=config.soft.pipeline_stages, cpu=True)
    assert ds["train_batch_size"] == config.micro_batch_size * config.grad_accum
    assert config.lr > 0


def test_load_base(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert (config.micro_batch_size, config.grad_accum, config.lr, config.bf16) == (3, 5, 2e-5, False)
    assert config.soft.pipeline_stages == 2 and config.soft.train_steps == 10
    assert config.soft.seq_len == SoftOptions().seq_len  # unspecified options keep their defaults
    assert "soft" not in config.ds


@pytest.mark.parametrize("data, named", [
    (base(learning_rate=1e-4), "learning_rate"),  # unknown top-level key
    (base(soft={"exit_layers": [2, 4]}), "exit_layers"),  # unknown "soft" key
    (base(optimizer={"type": "AdamW", "params": {"lr": 1e-4, "momentum": 0.9}}), "momentum"),
    (base(scheduler={"type": "WarmupLR", "params": {}}), "scheduler"),
    (base(fp16={"enabled": True}), "fp16"),
    (base(torch_autocast={"enabled": True, "dtype": "bfloat16"}), 'set "autocast": true in the "soft" block'),
    (base(bf16={"enabled": True}, soft={"autocast": True}), "bf16 and autocast are both on: choose one"),
    (base(zero_optimization={"stage": 2}), "zero_optimization.stage must be one of 0, 1, got 2"),
    (base(zero_optimization={"stage": 3}), "zero_optimization.stage must be one of 0, 1, got 3"),
    (base(optimizer={"type": "AdamW", "params": {"weight_decay": 0.1}}), "lr"),
    (base(optimizer={"type": "SGD", "params": {"lr": 0.1}}), "AdamW"),
    ({k: v for k, v in BASE.items() if k != "optimizer"}, "optimizer"),
    (base(soft={"mode": "both"}), "'both'"),
    (base(soft={"template": "vicuna"}), "template must be one of alpaca, chat, got 'vicuna'"),
    (base(soft={"train_steps": 10, "warmup_steps": 11}), "warmup_steps=11 exceeds train_steps=10"),
    (base(soft={"pipeline_stages": 0}), "pipeline_stages must be >= 1, got 0"),
    (base(train_micro_batch_size_per_gpu=0), "train_micro_batch_size_per_gpu must be >= 1, got 0"),
    (base(optimizer={"type": "AdamW", "params": {"lr": 0.0}}), "learning rate must be > 0"),
])
def test_strictness_errors_name_the_problem(tmp_path, data, named):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, data))
    assert named in str(error.value)


def test_allowed_zero_stages(tmp_path):
    for stage in (0, 1):
        config = load_config(write(tmp_path, base(zero_optimization={"stage": stage})))
        assert config.ds["zero_optimization"]["stage"] == stage


def test_bad_json_names_file(tmp_path):
    path = write(tmp_path, '{"train_micro_batch_size_per_gpu": 1,', name="broken.json")
    with pytest.raises(ConfigError, match=r"broken\.json.*not valid JSON"):
        load_config(path)
    path = write(tmp_path, "[1, 2]", name="list.json")
    with pytest.raises(ConfigError, match=r"list\.json.*JSON object"):
        load_config(path)


def test_missing_file_names_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.json.*not found"):
        load_config(str(tmp_path / "nowhere.json"))


def test_deepspeed_config_derives_batch_size(tmp_path):
    config = load_config(write(tmp_path, BASE))
    ds = config.deepspeed_config(world_size=8, cpu=True)
    assert config.data_parallel_size(8) == 4
    assert ds["train_batch_size"] == 3 * 5 * 4 == config.train_batch_size(8)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert config.deepspeed_config(world_size=2, cpu=True)["train_batch_size"] == 15
    # The file's own dict is left alone: derived keys go into a copy.
    assert "train_batch_size" not in config.ds and "scheduler" not in config.ds
    assert "torch_adam" not in config.ds["optimizer"]["params"]


def test_deepspeed_config_other_fields(tmp_path):
    config = load_config(write(tmp_path, BASE))
    cpu = config.deepspeed_config(world_size=4, cpu=True)
    gpu = config.deepspeed_config(world_size=4, cpu=False)
    assert cpu["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.95], "weight_decay": 0.0,
                                          "torch_adam": True}
    # GPUs: torch's fused AdamW (compiled into torch), never DeepSpeed's JIT-built FusedAdam.
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["fused"] is True
    assert "data_types" not in cpu  # fp32: nothing to say
    assert cpu["pipeline"]["activation_checkpoint_interval"] == 0
    config = override(config, activation_checkpointing=True)
    assert config.deepspeed_config(world_size=4, cpu=True)["pipeline"]["activation_checkpoint_interval"] == 1


def test_stated_train_batch_size_must_agree(tmp_path):
    config = load_config(write(tmp_path, base(train_batch_size=60)))
    assert config.deepspeed_config(world_size=8, cpu=True)["train_batch_size"] == 60
    with pytest.raises(ConfigError) as error:
        config.deepspeed_config(world_size=4, cpu=True)  # 3 x 5 x 2 = 30, not 60
    message = str(error.value)
    for part in ("train_batch_size=60", "micro batch 3", "gradient accumulation 5", "data parallel 2",
                 "4 processes", "2 stages", "= 30"):
        assert part in message, (part, message)


def test_world_size_not_divisible_by_pipeline(tmp_path):
    config = load_config(write(tmp_path, BASE))
    with pytest.raises(ConfigError, match=r"world size 7 .*pipeline_stages=2"):
        config.deepspeed_config(world_size=7, cpu=True)


def test_lr_schedule_warmup_then_cosine(tmp_path):
    """Linear warm-up that reaches the peak at the last warm-up step (no step at lr 0), cosine
    decay to min_lr_ratio x lr at the last step; DeepSpeed gets no scheduler block of its own."""
    config = load_config(write(tmp_path, base(soft={"train_steps": 20, "warmup_steps": 4, "min_lr_ratio": 0.1})))
    assert "scheduler" not in config.deepspeed_config(world_size=1, cpu=True)
    m = [config.lr_multiplier(step) for step in range(20)]
    assert m[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert m[4] == pytest.approx(1.0) and m[-1] == pytest.approx(0.1)
    assert m[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 15)))
    assert all(a >= b for a, b in zip(m[4:], m[5:]))


def test_lr_schedule_without_warmup(tmp_path):
    config = load_config(write(tmp_path, base(soft={"train_steps": 5, "warmup_steps": 0})))
    assert [config.lr_multiplier(s) for s in range(5)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)])


def test_lr_schedule_drives_torch_scheduler(tmp_path):
    """What the engine builds: LambdaLR(optimizer, lr_multiplier), stepped once per optimizer step."""
    torch = pytest.importorskip("torch")
    config = load_config(write(tmp_path, base(soft={"train_steps": 6, "warmup_steps": 2})))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_multiplier)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([config.lr * config.lr_multiplier(s) for s in range(6)])
    assert lrs[0] > 0


def test_override_aliases(tmp_path):
    config = load_config(write(tmp_path, BASE))
    original = config
    config = override(config, micro_batch_size=4, grad_accum=6, lr=3e-4, bf16=True, zero_stage=1,
                      gradient_clipping=0.5, pipeline_stages=4, seq_len=None)
    assert config is not original and original.micro_batch_size != 4  # a copy; the input is untouched
    assert config.ds["train_micro_batch_size_per_gpu"] == 4 and config.micro_batch_size == 4
    assert config.ds["gradient_accumulation_steps"] == 6 and config.grad_accum == 6
    assert config.lr == 3e-4 and config.bf16 is True
    assert config.ds["zero_optimization"] == {"stage": 1}
    assert config.ds["gradient_clipping"] == 0.5
    assert config.soft.pipeline_stages == 4
    assert config.soft.seq_len == SoftOptions().seq_len  # None means "not given"
    assert config.deepspeed_config(world_size=8, cpu=True)["train_batch_size"] == 4 * 6 * 2


@pytest.mark.parametrize("values, named", [
    ({"warmup_steps": 11}, "warmup_steps=11 exceeds train_steps=10"),
    ({"train_steps": 1}, "warmup_steps=2 exceeds train_steps=1"),
    ({"zero_stage": 3}, "command line: --zero-stage must be one of 0, 1, got 3"),
    ({"lr": -1.0}, "learning rate"),
    ({"micro_batch_size": 0}, "--micro-batch-size must be >= 1, got 0"),
    ({"mode": "both"}, "'both'"),
    ({"template": "vicuna"}, "--template must be one of alpaca, chat, got 'vicuna'"),
    ({"exit_chunk_tokens": -1}, "--exit-chunk-tokens must be >= 0, got -1"),
    ({"exit_loss": "sparse"}, "--exit-loss must be one of auto, whole, chunked, fused, got 'sparse'"),
    ({"exit_chunk_tokens": 0}, "exit_chunk_tokens=0: the fused exit loss works in chunks"),  # auto, fp32
    ({"exit_chunk_tokens": 0, "bf16": True}, "exit_chunk_tokens=0: the chunked exit loss"),  # auto, bf16
    ({"exit_chunk_tokens": 0, "autocast": True}, "exit_chunk_tokens=0: the fused exit loss"),  # auto, autocast
    ({"autocast": True, "bf16": True}, "bf16 and autocast are both on"),
    ({"exit_loss": "fused", "exit_chunk_tokens": 0}, "exit_chunk_tokens=0: the fused exit loss works in chunks"),
    ({"exit_loss": "chunked", "exit_chunk_tokens": 0}, "exit_chunk_tokens=0: the chunked exit loss"),
    ({"no_such_option": 1}, "'no_such_option'"),
])
def test_override_revalidates(tmp_path, values, named):
    config = load_config(write(tmp_path, BASE))
    with pytest.raises(ConfigError) as error:
        override(config, **values)
    assert named in str(error.value)


def test_run_config_defaults():
    config = RunConfig(ds={"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    assert (config.micro_batch_size, config.grad_accum, config.bf16) == (1, 1, False)
    assert config.soft.template == "alpaca"
    assert (config.soft.exit_loss, config.soft.exit_chunk_tokens, config.exit_loss) == ("auto", 1024, "fused")
    config.ds["bf16"] = {"enabled": True}  # bf16 would keep the fused loss's weight gradient: chunked
    assert config.exit_loss == "chunked"
    config.soft.exit_loss = "fused"
    assert config.exit_loss == "fused"
    config.ds["bf16"] = {"enabled": False}
    config.soft.exit_loss, config.soft.autocast = "auto", True  # fp32 weights: fused adds its gradient directly
    assert (config.exit_loss, config.precision) == ("fused", "fp32 + bf16 autocast")
    assert "torch_autocast" not in config.deepspeed_config(world_size=1, cpu=True)  # each layer enters it
    assert config.deepspeed_config(world_size=3, cpu=True)["train_batch_size"] == 3


@pytest.mark.parametrize("soft, message", [
    ({"train_steps": "100"}, r"soft\.train_steps must be an integer, got '100'"),
    ({"pipeline_stages": 1.5}, r"soft\.pipeline_stages must be an integer"),
    ({"activation_checkpointing": 1}, r"soft\.activation_checkpointing must be true or false"),
    ({"exits": [2, "4"]}, r"soft\.exits must be a list of integers"),
    ({"min_lr_ratio": 2.0}, r"soft\.min_lr_ratio must be <= 1\.0, got 2\.0"),
    ({"template": 1}, r"soft\.template must be a string, got 1"),
])
def test_soft_value_types_checked(tmp_path, soft, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, base(soft=soft)))


def test_fp16_refused_with_its_own_message(tmp_path):
    with pytest.raises(ConfigError, match="fp16 is not supported; use bf16"):
        load_config(write(tmp_path, base(fp16={"enabled": True})))


def test_failed_override_leaves_config_untouched(tmp_path):
    config = load_config(write(tmp_path, base(soft={"train_steps": 10, "warmup_steps": 2})))
    with pytest.raises(ConfigError, match="warmup_steps=50 exceeds train_steps=10"):
        override(config, warmup_steps=50)
    assert config.soft.warmup_steps == 2


def test_template_from_the_file_and_overridden(tmp_path):
    config = load_config(write(tmp_path, base(soft={"template": "chat"})))
    assert config.soft.template == "chat"
    assert override(config, template="alpaca").soft.template == "alpaca"
    assert override(config, template=None).soft.template == "chat"


# Shipped configs in bf16 (DeepSpeed's bf16 block), whose gradients must accumulate in fp32.
BF16_CONFIGS = {"pp4.json", "pp8.json"}


@pytest.fixture(scope="module")
def built_optimizers(tmp_path_factory) -> dict:
    """{"cpu" | "gpu": {shipped config: what DeepSpeed built from it}} (tests/_optimizer_worker.py)."""
    from conftest import deepspeed_launch
    out = tmp_path_factory.mktemp("optimizers")
    deepspeed_launch(1, "tests/_optimizer_worker.py", "--out", out, timeout=300)
    return json.loads((out / "optimizers.json").read_text())


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-config", "gpu-config"])
def test_each_shipped_config_builds_the_intended_optimizer(built_optimizers, gpu):
    """The optimizer DeepSpeed really builds from each shipped config: BF16_Optimizer (fp32 gradient
    accumulation) for bf16 under ZeRO-1, the ZeRO optimizer or plain AdamW in fp32; torch's AdamW
    always, its fused kernel in a GPU run's config (no FusedAdam JIT build on the nodes)."""
    built = built_optimizers["gpu" if gpu else "cpu"]
    shipped = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "ds_configs", "*.json")))
    assert sorted(built) == shipped
    for name, optimizer in built.items():
        config = load_config(os.path.join(REPO, "ds_configs", name))
        assert config.bf16 == (name in BF16_CONFIGS), name
        zero = config.ds.get("zero_optimization", {}).get("stage", 0)
        if config.bf16:
            expected = ("BF16_Optimizer", "float32")
        else:
            expected = ("DeepSpeedZeroOptimizer" if zero else "AdamW", "float32")
        assert (optimizer["optimizer"], optimizer["grad_accum_dtype"]) == expected, (name, optimizer)
        assert optimizer["basic"] == "AdamW" and optimizer["fused"] == gpu, (name, optimizer)


def test_autocast_setting_and_data_types(tmp_path):
    """soft.autocast is true, false or "auto" (the default); bf16 runs get fp32 gradient
    accumulation, and a config asking for another is refused."""
    assert SoftOptions().autocast == "auto"
    for value in (True, False, "auto"):
        assert load_config(write(tmp_path, base(soft={"autocast": value}))).soft.autocast == value
    for value in ("yes", 1, None):
        with pytest.raises(ConfigError, match='soft.autocast must be true, false or "auto"'):
            load_config(write(tmp_path, base(soft={"autocast": value})))
    # autocast auto beside bf16: fine
    config = load_config(write(tmp_path, base(bf16={"enabled": True}, zero_optimization={"stage": 1})))
    assert config.deepspeed_config(world_size=2, cpu=True)["data_types"] == {"grad_accum_dtype": "fp32"}
    with pytest.raises(ConfigError, match="soft-ds accumulates gradients in fp32"):
        load_config(write(tmp_path, base(bf16={"enabled": True}, data_types={"grad_accum_dtype": "bf16"})))
    # Without ZeRO DeepSpeed offers bf16 only bf16 gradient accumulation (and refuses fp32 outright).
    with pytest.raises(ConfigError, match="bf16 needs zero_optimization.stage 1"):
        load_config(write(tmp_path, base(bf16={"enabled": True})))
