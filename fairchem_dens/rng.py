"""Global random-number-generator state for exact resumes.

Stock fairchem checkpoints hold the model, optimiser, scheduler, EMA and step, but not the state
of the global generators. EquiformerV2 draws the roll angles of its edge frames from the global
torch generator on every forward (``init_edge_rot_mat``: ``torch.rand_like``), and dropout draws
from it too, so a run resumed from a checkpoint diverges from the uninterrupted run from its first
step unless the generator states are restored as well.
:class:`~fairchem_dens.resume.ExactResumeMixin` (and so the DeNS trainer) stores :func:`capture`
in every training-state checkpoint (key ``rng_state``) and :func:`restore`\\ s it when training
resumes (not for predict/validate/relaxations). The DeNS corruption stream needs none of this:
it is a pure function of (seed, step, rank), see :func:`fairchem_dens.corruption.step_generator`.

The state is that of the process that writes the checkpoint (rank 0). Restoring it on every rank
makes a single-process resume bit-exact; with several ranks the other ranks resume from rank 0's
state (statistically equivalent, not bitwise identical to the uninterrupted run).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

RNG_STATE_KEY = "rng_state"


def capture() -> dict[str, Any]:
    """States of the python, numpy, torch CPU and (when available) all CUDA generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture`; CUDA states are restored when saved and the device count
    matches (a checkpoint moved to another machine keeps the current CUDA seeds otherwise)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8, device="cpu"))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8, device="cpu")
                                      for s in cuda])
