"""Builds, for every shipped config (ds_configs/*.json), the DeepSpeed engine training would build,
on the debug model in one process (launched by tests/test_config.py), and writes which optimizer
DeepSpeed chose: {"cpu" | "gpu": {config file: {"optimizer": class, "basic": class, "fused": bool,
"grad_accum_dtype"}}}. "gpu" is built from the config a GPU run gets (`deepspeed_config(cpu=False)`),
which on CPU checks that DeepSpeed accepts it and what it constructs, not GPU numbers."""

import glob
import json
import os

import _worker
from soft_ds.config import load_config, override
from soft_ds.exits import make_exits
from soft_ds.model import preset_config, random_weights


def main():
    args = _worker.start()
    from soft_ds.pipe import build_engine, build_pipeline
    model_config = preset_config("debug")
    result = {"cpu": {}, "gpu": {}}
    for path, gpu in ((path, gpu) for path in sorted(glob.glob("ds_configs/*.json")) for gpu in (False, True)):
        # One process: one stage, no exits beyond the debug model's depth; the precision, ZeRO and
        # optimizer settings, which decide the optimizer, are the file's own.
        config = override(load_config(path), pipeline_stages=1, exits=[4, 8], exit_weights=[1.0, 1.0],
                          seq_len=16)
        module = build_pipeline(model_config, make_exits([4, 8], 8), 1, 16, random_weights(model_config, 0))
        ds_config = config.deepspeed_config(world_size=1, cpu=not gpu)
        engine = build_engine(module, ds_config, lr_multiplier=config.lr_multiplier)
        basic = engine.basic_optimizer
        result["gpu" if gpu else "cpu"][os.path.basename(path)] = {
            "optimizer": type(engine.optimizer).__name__, "basic": type(basic).__name__,
            "fused": bool(basic.defaults.get("fused")),
            "grad_accum_dtype": str(engine.get_data_types()[1]).replace("torch.", "")}
        engine.destroy()
    with open(os.path.join(args.out, "optimizers.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
