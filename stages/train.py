"""Train stage: softmax regression on Fashion-MNIST, as in D2L 3.7 (train_ch3), reproducibly.

    python -m stages.train --data data/fashion-mnist --model models/model.pt \
        --history reports/train/history.json --run-info reports/train/run.json
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

from stages import ArgumentParser, check_interrupt, determinism, files, importing, run_stage, tracking, warm
from stages.config import Params, load_params
from stages.data import verify_dir
from stages.forked import Forked, tell_parent, wait_for_parent

SERVED_MODEL = Path(__file__).with_name("served_model.py")  # what MLflow serves: the checkpoint, named classes


def train_model(args, params: Params):
    """The torch half: data, model, epochs. Runs in a process of its own (stages/forked.py): it
    tells the stage the data's SHA-256 once the data passed its checks, waits until the MLflow run
    is open, tells each epoch's history row as it ends, and returns what the stage publishes."""
    with importing():
        from stages import training  # torch, after determinism.apply
        from stages.model import checkpoint_bytes

    determinism.threads(params.determinism)
    device = training.device_for(params.device)
    data = training.load_datasets(args.data, params, device)
    tell_parent(verify_dir(args.data))  # after the shape and range checks, whose messages say more
    model = training.new_model(params, device)
    # torch.optim imports torch._dynamo when it builds its first optimizer (~1.8 s): done here, the
    # import overlaps the stage's opening of the run instead of following it.
    with importing():
        import torch._dynamo  # noqa: F401

    wait_for_parent()  # the run is open
    history, kept_epoch = training.fit(
        model, data.train, data.eval, params, eval_name=data.eval_name,
        on_epoch=lambda row: tell_parent((row, int(time.time() * 1000))),
    )  # fmt: skip
    checkpoint = checkpoint_bytes(model, params.hyperparameters(), kept_epoch=kept_epoch)
    return history, kept_epoch, checkpoint, data.example.numpy(), data.eval_name


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--run-info", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()  # before any heavy import: a bad value costs a fraction of a second
    determinism.apply(params.determinism)
    # torch and the training in a child, MLflow's import here: ~3 s each, side by side. The run is
    # opened once the data passed its checks, and the child trains only once it is open.
    with Forked(train_model, args, params) as training:
        tracking.preload()
        data_sha256 = training.receive()
        with tracking.training_run(params, data_sha256=data_sha256) as run:
            training.send("train")
            # MLflow runs stages/served_model.py (torch) to check the logged model: loaded while the child trains.
            with importing():
                import torch  # noqa: F401

            if run.store.is_local:  # its connections can be renewed in a forked process; a server's cannot
                warm.offer("evaluate", leave=(training,))  # evaluate's imports, beside the epochs
            with files.Outputs() as out:
                for row, ended_ms in training.messages():
                    run.log_epoch(row, ended_ms)
                history, kept_epoch, checkpoint, example, eval_name = training.result()
                model_md5 = hashlib.md5(checkpoint).hexdigest()
                history_json = files.json_bytes(history)
                run.log_training(history, kept_epoch, history_json)
                run.log_model(SERVED_MODEL, checkpoint, example)
                run.tag_model_md5(model_md5)
                # Only what the same params and data reproduce: no run id, so a rerun leaves dvc.lock as it was.
                run_info = {"epochs_run": len(history), "kept_epoch": kept_epoch, "model_md5": model_md5}
                out.write_bytes(args.model, checkpoint)
                out.write_bytes(args.history, history_json)
                out.write_json(args.run_info, run_info)
                check_interrupt()  # the last safe point: after it, all three files move into place together
            run.register_model()  # only once the files are out: MLflow follows DVC
    kept = history[kept_epoch - 1][eval_name]
    print(f"saved {args.model} (epoch {kept_epoch}: {eval_name} {kept:.4f}); MLflow run {run.run_id}")


if __name__ == "__main__":
    run_stage(main)  # returns only when the stage succeeded: outputs published, MLflow told
    sys.stderr.flush()
    os._exit(0)  # without the interpreter's teardown of torch's and MLflow's modules (~0.5 s)
