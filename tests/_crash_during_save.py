"""soft_ds/train.py, killed part-way through one checkpoint save (launched by the `deepspeed`
launcher from tests/test_checkpoint.py).

    _crash_during_save.py --crash_at=POINT:STEP [train.py options...]

POINT is where the save of step STEP dies, as a kill would stop it (os._exit: no cleanup, no
flushing of Python buffers):
  deepspeed  every rank, once its stage's layer files are written (the rest of DeepSpeed's are not)
  metadata   rank 0, after every rank's DeepSpeed files, before the metadata
  latest     rank 0, after the metadata and the tokenizer, before `latest` is touched
  rename     rank 0, after latest's temporary file is on disk, before it is renamed over `latest`
  prune      rank 0, after STEP's save is committed, part-way through deleting an older checkpoint
             (keep_checkpoints): renamed to its `.deleting-` name, one of its files removed
The other ranks are then stopped by the launcher, which ends the job when one rank fails.
"""

import os
import shutil
import sys

from soft_ds import checkpoint, pipe, train

CRASH_EXIT_CODE = 17


def main():
    flag = next(arg for arg in sys.argv[1:] if arg.startswith("--crash_at="))
    argv = [arg for arg in sys.argv[1:] if arg != flag]
    point, step = flag.removeprefix("--crash_at=").split(":")
    tag = f"step{step}"

    def die():
        print(f"killed at {point} of the {tag} save", flush=True)
        os._exit(CRASH_EXIT_CODE)

    if point == "deepspeed":
        save_state_dict = pipe.SoftPipelineModule.save_state_dict

        def layers_then_die(self, save_dir, *args, **kwargs):
            save_state_dict(self, save_dir, *args, **kwargs)
            if os.path.basename(save_dir) == tag:
                die()
        pipe.SoftPipelineModule.save_state_dict = layers_then_die
    elif point in ("metadata", "latest"):
        write_atomically = checkpoint._write_atomically

        def die_before(path, text):
            if (point == "metadata" and path.endswith(os.path.join(tag, checkpoint.META_FILE))) or \
                    (point == "latest" and path.endswith(checkpoint.LATEST_FILE) and text == tag):
                die()
            write_atomically(path, text)
        checkpoint._write_atomically = die_before
    elif point == "rename":
        replace = os.replace

        def die_instead(source, target):
            if str(target).endswith(checkpoint.LATEST_FILE):
                with open(source) as f:
                    if f.read() == tag:
                        die()
            replace(source, target)
        os.replace = die_instead  # the one checkpoint.py calls
    elif point == "prune":
        rmtree = shutil.rmtree

        def part_then_die(path, *args, **kwargs):
            latest = os.path.join(os.path.dirname(path), checkpoint.LATEST_FILE)
            if os.path.basename(path).startswith(checkpoint.DELETING) and open(latest).read() == tag:
                os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
                die()
            rmtree(path, *args, **kwargs)
        shutil.rmtree = part_then_die  # the one checkpoint.prune calls
    else:
        raise SystemExit(f"unknown crash point {point!r}")
    train.main(argv)


if __name__ == "__main__":
    main()
