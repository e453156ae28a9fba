"""MLflow tracking, by concept: the store (store.py), where a run comes from (provenance.py), the
champion rule (champion.py) and the runs themselves (runs.py).

DVC and MLflow are linked by the model's md5 (the one `dvc.lock` records for models/model.pt),
not by a run id: train tags its run `dvc.model_md5`, evaluate finds the run by that tag. A run id
in a DVC output would change `dvc.lock` on every rerun of the same params and data, and a run
restored from DVC's run-cache (no command runs) still leads to the run that trained it.
"""

from stages.tracking.champion import CHAMPION
from stages.tracking.runs import evaluation_run, training_run
from stages.tracking.store import TrackingError, connect, preload, redacted

__all__ = ["CHAMPION", "TrackingError", "connect", "evaluation_run", "preload", "redacted", "training_run"]
