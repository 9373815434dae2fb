"""The average of several models' predictions, as one model.

A node's personalised model may be the average of its fine-tuned federated model and its own-records
model (:func:`clients.personalise.choose_kept`, ``kept = "average"``): two models trained from different
starts make partly independent errors, so their average is rarely much worse than the better of them and
often better than both. It is an ordinary ``nn.Module`` whose outputs mean what a member's outputs mean
(logits, or scaled forecasts), so every scorer and server of a single model scores and serves it.
"""

from __future__ import annotations

import torch
from torch import nn

#: The task whose outputs are logits (the others' outputs are averaged as they are).
CLASSIFICATION = "binary-classification"


class MeanEnsemble(nn.Module):
    """Average of its members' predictions.

    Parameters
    ----------
    members : sequence of nn.Module
        Models with the same inputs and outputs (their state dict keys are ``members.<i>.<name>``).
    task : str
        ``"binary-classification"``: the members' logits are turned into probabilities, averaged, and
        returned as the logit of the mean probability (computed in log space, so it stays finite where
        a member is certain); otherwise (forecasting) the outputs are averaged.
    """

    def __init__(self, members, task: str):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("MeanEnsemble needs at least one member model")
        self.members = nn.ModuleList(members)
        self.task = str(task)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([m(x) for m in self.members])
        if self.task != CLASSIFICATION:
            return outs.mean(0)
        # logit(mean sigmoid(o_i)) = log(sum sigmoid(o_i)) - log(sum sigmoid(-o_i)); the 1/n cancels
        return torch.logsumexp(nn.functional.logsigmoid(outs), 0) - torch.logsumexp(nn.functional.logsigmoid(-outs), 0)
