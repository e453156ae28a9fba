"""Train stage: softmax regression on Fashion-MNIST, as in D2L 3.7 (train_ch3), reproducibly.

    python -m stages.train --data data/fashion-mnist --model models/model.pt \
        --history reports/train/history.json --run-info reports/train/run.json
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from stages import ArgumentParser, check_interrupt, determinism, files, run_stage, tracking
from stages.config import load_params
from stages.data import verify_dir

SERVED_MODEL = Path(__file__).with_name("served_model.py")  # what MLflow serves: the checkpoint, named classes


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--run-info", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()  # before any heavy import: a bad value costs a fraction of a second
    determinism.apply(params.determinism)

    from stages import training  # torch, after determinism.apply
    from stages.model import checkpoint_bytes

    determinism.threads(params.determinism)
    device = training.device_for(params.device)
    data = training.load_datasets(args.data, params, device)
    data_sha256 = verify_dir(args.data)  # after the shape and range checks, whose messages say more
    model = training.new_model(params, device)
    with tracking.training_run(params, data_sha256=data_sha256) as run:
        with files.Outputs() as out:
            history, kept_epoch = training.fit(
                model, data.train, data.eval, params, eval_name=data.eval_name, on_epoch=run.log_epoch
            )
            checkpoint = checkpoint_bytes(model, params.hyperparameters(), kept_epoch=kept_epoch)
            model_md5 = hashlib.md5(checkpoint).hexdigest()
            history_json = files.json_bytes(history)
            run.log_training(history, kept_epoch, history_json)
            run.log_model(SERVED_MODEL, checkpoint, data.example.numpy())
            run.tag_model_md5(model_md5)
            # Only what the same params and data reproduce: no run id, so a rerun leaves dvc.lock as it was.
            run_info = {"epochs_run": len(history), "kept_epoch": kept_epoch, "model_md5": model_md5}
            out.write_bytes(args.model, checkpoint)
            out.write_bytes(args.history, history_json)
            out.write_json(args.run_info, run_info)
            check_interrupt()  # the last safe point: after it, all three files move into place together
        run.register_model()  # only once the files are out: MLflow follows DVC
    kept = history[kept_epoch - 1][data.eval_name]
    print(f"saved {args.model} (epoch {kept_epoch}: {data.eval_name} {kept:.4f}); MLflow run {run.run_id}")


if __name__ == "__main__":
    run_stage(main)  # returns only when the stage succeeded: outputs published, MLflow told
    sys.stderr.flush()
    os._exit(0)  # without the interpreter's teardown of torch's and MLflow's modules (~0.5 s)
