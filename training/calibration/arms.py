"""The arms of a calibration, from the shard manifest alone: a held-out set, then per arm the key list of
the clips it trains on (a `LoaderConfig.subset` file, so an arm is an ordinary `lvd train` run).

- pool: the samples of `query`, minus the held-out clips.
- baseline: the whole pool.
- <score>-<bottom|top>-<f>: the pool without the f% lowest (highest) values of the score, the percentile
  taken over the pool's scored clips as curation's drop_bottom_pct / drop_top_pct are; clips without the
  score are dropped too (curation drops them as `<score>_missing`).
- random-<f>: the pool without f% of it chosen by a hash of (seed, key): what losing that many clips for no
  reason does.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import ConfigError
from shards.manifest import Manifest, save_subset
from training.calibration.config import CalibrateConfig

PLAN = "plan.json"
HELDOUT = "heldout.parquet"


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str             # baseline | filter | random
    score: str | None
    direction: str | None
    fraction: float       # percent of the pool dropped (0 for the baseline)
    num_samples: int
    rule: str             # what it keeps, in words

    def folder(self, output: str | Path) -> Path:
        return Path(output) / "arms" / self.name


def hash_order(keys: pd.Series, seed: int, salt: str) -> np.ndarray:
    """Positions of `keys` sorted by a seeded hash of the key: a random order that depends on nothing but the
    keys themselves (not on the manifest's row order or the number of samples)."""
    hash_key = f"{salt}{seed}".encode().hex()[:16].ljust(16, "0")
    hashes = pd.util.hash_array(np.asarray(keys, dtype=object), hash_key=hash_key)
    return np.argsort(hashes, kind="stable")


def fraction_label(f: float) -> str:
    return f"{f:g}"


def plan(config: CalibrateConfig, manifest: Manifest) -> tuple[np.ndarray, list[tuple[Arm, np.ndarray]]]:
    """(held-out rows, [(arm, rows)]) of the manifest. Raises ConfigError for scores the manifest lacks or a
    pool too small to hold out and train on."""
    missing = [s for s in config.scores if s not in manifest.schema.names]
    if missing:
        raise ConfigError(f"scores {missing} are not columns of {config.shard_folder}'s manifest; its scores are "
                          f"{manifest.score_columns}")
    try:
        pool = manifest.select(config.query)
    except ValueError as e:
        raise ConfigError(f"query {config.query!r}: {e}") from None
    try:
        candidates = np.intersect1d(pool, manifest.select(config.heldout.query))
    except ValueError as e:
        raise ConfigError(f"heldout.query {config.heldout.query!r}: {e}") from None
    n_held = config.heldout.num_samples
    if len(candidates) < n_held or len(pool) < n_held + 2:
        raise ConfigError(f"the pool ({config.query or 'every sample'}) has {len(pool)} clips, {len(candidates)} of "
                          f"them held-out candidates (heldout.query {config.heldout.query!r}); heldout.num_samples="
                          f"{n_held} needs that many and leaves the rest to train on: lower heldout.num_samples")
    # the key and the scores tried, nothing else (a calibration pool is millions of clips)
    samples = manifest.scan(["key", *config.scores]).to_pandas()
    order = hash_order(samples["key"].iloc[candidates], config.heldout.seed, "heldout")
    heldout = np.sort(candidates[order[:n_held]])
    train_pool = np.setdiff1d(pool, heldout)
    arms: list[tuple[Arm, np.ndarray]] = []
    if config.baseline:
        arms.append((Arm("baseline", "baseline", None, None, 0.0, len(train_pool), "the whole pool"), train_pool))
    for score, spec in config.scores.items():
        values = pd.to_numeric(samples[score].iloc[train_pool], errors="coerce").to_numpy(dtype=np.float64)
        scored = np.isfinite(values)
        if not scored.any():
            raise ConfigError(f"score {score} has no values in the pool; drop it from scores or curate with its stage on")
        for f in config.fractions_of(score):
            if spec.direction == "bottom":
                bound = float(np.percentile(values[scored], f))
                keep = scored & (values >= bound)
                rule = f"{score} >= {bound:.6g} (drop the bottom {f:g}%)"
            else:
                bound = float(np.percentile(values[scored], 100 - f))
                keep = scored & (values <= bound)
                rule = f"{score} <= {bound:.6g} (drop the top {f:g}%)"
            dropped = 100 * (1 - keep.sum() / len(train_pool))
            if abs(dropped - f) > 100 / len(train_pool):  # ties at the bound or clips without the score
                rule += f"; drops {dropped:.3g}% of the pool: ties at the bound, or clips without {score}"
            name = f"{score}-{spec.direction}-{fraction_label(f)}"
            arms.append((Arm(name, "filter", score, spec.direction, f, int(keep.sum()), rule), train_pool[keep]))
    if config.random_control:
        fractions = sorted({f for s in config.scores for f in config.fractions_of(s)})
        order = hash_order(samples["key"].iloc[train_pool], config.heldout.seed, "random")
        for f in fractions:
            n = int(round(len(train_pool) * (1 - f / 100)))
            arms.append((Arm(f"random-{fraction_label(f)}", "random", None, None, f, n,
                             f"a random {100 - f:g}% of the pool (hash of the key)"), np.sort(train_pool[order[:n]])))
    for arm, rows in arms:
        if len(rows) == 0:
            raise ConfigError(f"arm {arm.name} keeps no clips ({arm.rule}); lower its fractions")
    return heldout, arms


def write_plan(config: CalibrateConfig, manifest: Manifest, heldout: np.ndarray,
               arms: list[tuple[Arm, np.ndarray]], done: set[str], proxy: dict) -> None:
    """heldout.parquet, arms/<arm>/subset.parquet (not rewritten for finished arms) and plan.json. Resuming with
    other shards, another held-out set or another proxy recipe (`proxy`: the resolved recipe every arm shares)
    is refused: the finished arms would not compare with new ones."""
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    basis = {"manifest": manifest.fingerprint(), "heldout": config.heldout.model_dump(mode="json"), "proxy": proxy}
    plan_file = out / PLAN
    if plan_file.is_file():
        before = json.loads(plan_file.read_text()).get("basis")
        if before != basis:
            changed = [k for k in basis if (before or {}).get(k) != basis[k]]
            raise ConfigError(f"{out} holds a calibration with another {', '.join(changed)}; its finished arms "
                              "would not compare with new ones: use a new output folder")
    save_subset(manifest, heldout, str(out / HELDOUT), "held out")
    for arm, rows in arms:
        if arm.name in done:
            continue
        folder = arm.folder(out)
        folder.mkdir(parents=True, exist_ok=True)
        save_subset(manifest, rows, str(folder / "subset.parquet"), arm.rule)
    plan_file.write_text(json.dumps({"basis": basis, "shards": config.shard_folder, "num_heldout": len(heldout),
                                     "arms": [asdict(a) for a, _ in arms]}, indent=1))
