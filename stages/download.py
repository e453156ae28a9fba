"""Download stage: the four Fashion-MNIST files, verified, into one directory.

python -m stages.download --out data/fashion-mnist
"""

from __future__ import annotations

from pathlib import Path

from stages import ArgumentParser, run_stage
from stages.config import load_params
from stages.data import fetch_all, read_checksums, sources_from


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    data = load_params().data
    sources = sources_from(data.local_dirs, data.mirrors)
    fetch_all(args.out, sources, read_checksums(), data.timeout_s, data.retries, data.deadline_s)


if __name__ == "__main__":
    run_stage(main)
