"""Poisson-sampled batches of a ``TensorDataset`` by tensor indexing.

Opacus' ``DPDataLoader`` draws each batch with its ``UniformWithReplacementSampler`` (every
record in independently with probability ``sample_rate``), then fetches the records one by one
(``dataset[i]`` for each index) and stacks them with ``default_collate``. For tabular and
windowed tensors that per-record fetch was about a fifth of a DP-SGD epoch of the health model
(cProfile, 1 thread). :class:`TensorPoissonLoader` keeps Opacus' sampler object itself, hence
the same generator and the same draws, and fetches each batch with one index per tensor; an
empty draw gives tensors with a zero batch dimension, as Opacus' empty-batch collate does.
"""

from __future__ import annotations

from typing import Iterator

import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import TensorDataset
from torch.utils.data._utils.collate import default_collate


class TensorPoissonLoader:
    """Iterate the Poisson batches of an Opacus ``DPDataLoader`` over a ``TensorDataset``.

    Parameters
    ----------
    dp_loader : opacus.data_loader.DPDataLoader
        The loader ``PrivacyEngine.make_private`` returned; its batch sampler draws the batches.
    """

    def __init__(self, dp_loader: DPDataLoader):
        if not self.applies_to(dp_loader):
            raise ValueError(f"TensorPoissonLoader needs a single-process DPDataLoader over a TensorDataset with the "
                             f"default collate and Opacus' UniformWithReplacementSampler (got {dp_loader!r}); keep "
                             "the DPDataLoader itself otherwise")
        self.dataset: TensorDataset = dp_loader.dataset
        self.batch_sampler: UniformWithReplacementSampler = dp_loader.batch_sampler
        self.sample_rate: float = dp_loader.sample_rate

    @staticmethod
    def applies_to(loader) -> bool:
        """Whether ``loader`` is one this class reproduces exactly (else keep it as it is)."""
        collate = getattr(loader, "collate_fn", None)
        return (isinstance(loader, DPDataLoader) and isinstance(loader.dataset, TensorDataset)
                and type(loader.batch_sampler) is UniformWithReplacementSampler and loader.num_workers == 0
                and getattr(collate, "wrapped_collator_fn", None) is default_collate
                and not getattr(collate, "rand_on_empty", False))

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        tensors = self.dataset.tensors
        for indices in self.batch_sampler:
            idx = torch.as_tensor(indices, dtype=torch.long)
            yield tuple(t[idx] for t in tensors)
