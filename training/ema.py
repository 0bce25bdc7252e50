"""Exponential moving average of the trained weights, kept in fp32 by rank 0 alone.

Under ZeRO 0-2 every rank holds the full weights, so rank 0 reads its own. Under ZeRO-3 the weights are
partitioned: an update gathers them (a collective every rank joins, a bounded number of elements at a
time) and rank 0 averages. One full copy on one rank keeps the EMA independent of the number of ranks, so
it survives a resume on another world size unchanged. (With bf16 training the average is taken of the bf16
model weights, as diffusers' EMAModel does, not of the optimizer's fp32 master copy.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from training.stage_config import EMAConfig

GATHER_ELEMENTS = 50_000_000  # per ZeRO-3 gather: bounds the transient memory of an update


class EMA:
    """fp32 averages of `params` (name -> parameter of the module DeepSpeed trains)."""

    def __init__(self, config: EMAConfig, params: dict[str, nn.Parameter], rank: int, zero3: bool) -> None:
        self.config = config
        self.params = params
        self.rank, self.zero3 = rank, zero3
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        for names, tensors in self._full_weights():
            if rank == 0:
                for name, t in zip(names, tensors):
                    self.shadow[name] = t.detach().float().clone()

    def _full_weights(self) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
        """(names, full tensors) in chunks; under ZeRO-3 every rank must iterate (the gathers are collective)."""
        items = list(self.params.items())
        if not self.zero3:
            yield [n for n, _ in items], [p.data for _, p in items]
            return
        import deepspeed

        chunk: list[tuple[str, nn.Parameter]] = []
        size = 0
        for name, p in items + [("", None)]:
            if p is not None:
                chunk.append((name, p))
                size += int(getattr(p, "ds_numel", p.numel()))
            if chunk and (p is None or size >= GATHER_ELEMENTS):
                with deepspeed.zero.GatheredParameters([q for _, q in chunk], modifier_rank=None):
                    yield [n for n, _ in chunk], [q.data for _, q in chunk]
                chunk, size = [], 0

    def decay(self) -> float:
        d = self.config.decay
        if self.config.warmup:
            d = min(d, (1 + self.num_updates) / (10 + self.num_updates))
        return d ** self.config.update_every

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1-based); every rank calls it (ZeRO-3 gathers are collective)."""
        if step % self.config.update_every:
            return
        d = self.decay()
        for names, tensors in self._full_weights():
            if self.rank == 0:
                for name, t in zip(names, tensors):
                    self.shadow[name].lerp_(t.float().to(self.shadow[name].device), 1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__num_updates__": torch.tensor(self.num_updates)}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: Path) -> None:
        """Rank 0 reads the averages; the other ranks only the update count (they hold no averages)."""
        from safetensors.torch import load_file

        state = load_file(str(path))
        self.num_updates = int(state.pop("__num_updates__"))
        if self.rank != 0:
            return
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise ValueError(f"EMA file {path} lacks {len(missing)} trained parameters (e.g. {missing[0]}); it was "
                             "saved with another `trainable` setting")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    def averaged(self) -> dict[str, torch.Tensor]:
        """name -> fp32 average (rank 0)."""
        return self.shadow
