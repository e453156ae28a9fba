"""Evaluate stage: test-set metrics, scikit-learn classification report, confusion matrix, pictures.

    python -m stages.evaluate --data data/fashion-mnist --model models/model.pt \
        --history reports/train/history.json --out reports/eval
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from stages import ArgumentParser, PipelineError, check_interrupt, determinism, files, importing, run_stage, warm
from stages.forked import Forked

if TYPE_CHECKING:
    from stages.config import Params

# What a warm start (stages/warm.py) imports ahead while train trains, MLflow and torch being loaded
# already. The stage's own modules load in its functions: the hand-off comes first (~0.2 s).
WARM_IMPORTS = ("stages.config", "stages.data", "stages.tracking", "stages.reports", "stages.model")


def test_outcomes(args, params: Params, images, labels):
    """The torch half: the model's test-set loss, predicted classes and probabilities."""
    with importing():
        import torch

        from stages.model import load_checkpoint, outcomes, predict

    determinism.threads(params.determinism)
    model, _ = load_checkpoint(args.model)
    logits = predict(model, torch.from_numpy(images), params.evaluate.batch_size)
    return outcomes(logits, torch.from_numpy(labels).long())


def compute_reports(args, params: Params, history: list[dict]) -> tuple[dict, dict[str, bytes]]:
    """The reports half: (metrics, every report file by name). Runs in a process of its own, and
    forks the torch half before it imports scikit-learn and matplotlib (~2 s), so the two imports
    overlap."""
    from stages.data import load_split

    images, labels = load_split(args.data, "test")  # read once: the torch half gets it by the fork
    with Forked(test_outcomes, args, params, images, labels) as torch_half:
        with importing():
            from stages import reports

        test_loss, predicted, probabilities = torch_half.result()
    return reports.report_files(
        history, test_loss, labels, predicted, probabilities, images, params.evaluate.misclassified_grid
    )


def main(argv: list[str] | None = None) -> None:
    from stages import tracking
    from stages.config import load_params

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    params = load_params()
    try:
        history = json.loads(args.history.read_text())
        model_md5 = hashlib.md5(args.model.read_bytes()).hexdigest()
    except (OSError, ValueError) as e:
        raise PipelineError(f"cannot read training outputs: {e}") from None
    determinism.apply(params.determinism)
    # The reports in a child (and torch in its child), MLflow's import here: side by side. The store is
    # opened only once the reports are computed, so a bad model fails before any run is touched.
    with Forked(compute_reports, args, params, history) as reports:
        tracking.preload()
        metrics, outputs = reports.result()
    with tracking.evaluation_run(params, model_md5) as run:
        with files.Outputs() as out:
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
    if (code := warm.take("evaluate")) is not None:  # run by train's warm process, imports done
        os._exit(code)
    run_stage(main)  # returns only when the stage succeeded: outputs published, MLflow told
    sys.stderr.flush()
    os._exit(0)  # without the interpreter's teardown of torch's and MLflow's modules (~0.5 s)
