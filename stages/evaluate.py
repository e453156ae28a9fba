"""Evaluate stage: test-set metrics, scikit-learn classification report, confusion matrix, pictures.

    python -m stages.evaluate --data data/fashion-mnist --model models/model.pt \
        --history reports/train/history.json --out reports/eval
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from stages import ArgumentParser, PipelineError, check_interrupt, determinism, files, run_stage, tracking
from stages.config import load_params
from stages.data import load_split


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    settings = params.evaluate
    try:
        history = json.loads(args.history.read_text())
        model_md5 = hashlib.md5(args.model.read_bytes()).hexdigest()
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read training outputs: {e}") from None
    determinism.apply(params.determinism)

    import torch

    from stages import reports  # torch and matplotlib, after determinism.apply
    from stages.model import load_checkpoint

    determinism.threads(params.determinism)
    model, _ = load_checkpoint(args.model)
    images, labels = load_split(args.data, "test")
    with tracking.evaluation_run(params, model_md5) as run:
        with files.Outputs() as out:
            logits = reports.predict(model, torch.from_numpy(images), settings.batch_size)
            metrics, outputs = reports.report_files(
                history, logits, torch.from_numpy(labels).long(), images, settings.misclassified_grid
            )
            for name, data in outputs.items():
                out.write_bytes(args.out / name, data)
            check_interrupt()
        # Only once the files are out (MLflow follows DVC): a failure here leaves the run's
        # `evaluation.status` tag "incomplete".
        run.log_evaluation(metrics, params.evaluation_settings(), outputs)
        champion = run.update_champion(metrics["test_acc"])
    print(outputs["classification_report.txt"].decode())
    print(f"test_acc {metrics['test_acc']:.4f}  test_loss {metrics['test_loss']:.4f}  (MLflow run {run.run_id})")
    print(champion)


if __name__ == "__main__":
    run_stage(main)
