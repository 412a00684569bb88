"""The split-half null's cost: identification of a finished count store with the null switched
off and with P permutations, per rule alone and with the rules side by side (one pass), on the
synchronous scheduler of this process (what the null adds is the same on a cluster: its sums
are one more read of the counts per batch, its selections run here). Prints seconds per setting
and what the null added per permutation.

    python benchmarks/split_null.py STORE.zarr                       # the default run's rules, 200
    python benchmarks/split_null.py STORE.zarr --rules lape --permutations 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import dask

from sparcom.config import DEFAULT_RULES
from sparcom.extraction.store import open_store
from sparcom.identification.identify import identify_store_rules
from sparcom.identification.settings import IdentificationSettings


def timed(store: Path, rules: list[str], permutations: int) -> float:
    settings = IdentificationSettings(rules=rules, split_half_permutations=permutations)
    with tempfile.TemporaryDirectory() as folder, dask.config.set(scheduler="synchronous"):
        start = time.perf_counter()
        identify_store_rules(store, settings, {rule: Path(folder) / rule for rule in rules})
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--rules", default=",".join(DEFAULT_RULES))
    parser.add_argument("--permutations", type=int, default=200)
    args = parser.parse_args()
    sizes = dict(open_store(args.store).sizes)
    print(f"store {args.store.name}: {sizes}")
    rules = args.rules.split(",")
    timed(args.store, rules[:1], 0)  # imports and the first read out of the figures
    for chosen in [[rule] for rule in rules] + ([rules] if len(rules) > 1 else []):
        without = timed(args.store, chosen, 0)
        with_null = timed(args.store, chosen, args.permutations)
        print(f"{','.join(chosen)}: {without:.1f} s without the null, {with_null:.1f} s with "
              f"{args.permutations} permutations ({1000 * (with_null - without) / args.permutations:.0f} ms "
              "per permutation)", flush=True)


if __name__ == "__main__":
    main()
