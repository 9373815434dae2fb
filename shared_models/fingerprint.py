"""A model's weights as one SHA-256: which global model a personalised one started from.

The node records the fingerprint of the global model it fine-tunes (``clients.personalise``);
``fl-serve --personalised`` recomputes it from the package it serves and refuses a personalised
model made from another run's global model. Both sides hash the weights as the model holds them
(after ``load_state_dict``), so the file format they came in does not matter.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np


def state_sha256(state: Mapping) -> str:
    """SHA-256 of a state dict: each tensor's name, dtype, shape and bytes, in name order.

    Parameters
    ----------
    state : mapping of str to torch.Tensor or numpy.ndarray
        A model's ``state_dict()`` (or the same arrays as numpy).

    Returns
    -------
    str
        64 hexadecimal digits; equal for equal names, dtypes, shapes and values (little-endian bytes).

    Examples
    --------
    >>> import torch
    >>> a = state_sha256({"w": torch.zeros(2)})
    >>> a == state_sha256({"w": torch.zeros(2).numpy()}) and a != state_sha256({"w": torch.ones(2)})
    True
    """
    h = hashlib.sha256(b"cityfed-state/1")
    for name in sorted(state):
        v = state[name]
        arr = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        arr = np.ascontiguousarray(arr)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        for part in (name.encode(), arr.dtype.str.encode(), repr(tuple(arr.shape)).encode()):
            h.update(struct.pack("<Q", len(part)) + part)
        data = arr.tobytes()
        h.update(struct.pack("<Q", len(data)) + data)
    return h.hexdigest()
