"""Number types for the command lines (clustvit and the benchmarks): a bad value is refused
by argparse with the option's name, before anything loads."""
from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def at_least_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 0")
    return value


def above_zero(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text}: must be in [0, 1]")
    return value


def add_cluster_floors(parser: argparse.ArgumentParser, what: str) -> None:
    """--cluster-floors F ... (one per cluster, in cluster order); 0 for a cluster without one."""
    parser.add_argument("--cluster-floors", type=probability, nargs="+", metavar="P",
                        help=f"{what}: per cluster (in cluster order; a model trained with --cluster-classes "
                             "has them in that order), the least probability a merge into it needs whatever "
                             "the threshold; 0 = none for that cluster. Default: the model's")
