"""Helpers shared by the tests (and the benchmark), by concern: data.py (tiny synthetic
Fashion-MNIST in real IDX format), projects.py (throwaway copies of the project in their own git
repos, the real `dvc` and stage commands), tracking.py (reading MLflow stores) and servers.py (real
servers on loopback, each started and stopped by PID). Everything is importable from here too."""

from tests.helpers.data import *  # noqa: F403
from tests.helpers.projects import *  # noqa: F403
from tests.helpers.servers import *  # noqa: F403
from tests.helpers.tracking import *  # noqa: F403
