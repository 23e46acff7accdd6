"""Test-only trainer for the multi-rank CLI run: the DeNS trainer unchanged, plus, after
``train()``, every rank writes its flattened parameters to ``<run_dir>/params_rank<r>.pt``.

Referenced by dotted path (``--trainer=tests.distributed.checksum_trainer.ChecksumTrainer``), so
the stock ``fairchem`` CLI needs the repository root on ``PYTHONPATH``."""

from __future__ import annotations

import os

import torch
from fairchem.core.common import distutils

from fairchem_dens.trainer import DenoisingForcesTrainer


class ChecksumTrainer(DenoisingForcesTrainer):
    def train(self, disable_eval_tqdm: bool = False) -> None:
        super().train(disable_eval_tqdm)
        params = torch.cat([p.detach().cpu().flatten()
                            for p in self._unwrapped_model.parameters()])
        rank, world = distutils.get_rank(), distutils.get_world_size()
        run_dir = os.path.dirname(os.path.dirname(self.config["cmd"]["checkpoint_dir"]))
        out = os.path.join(run_dir, f"params_rank{rank}.pt")
        torch.save({"params": params, "step": self.step, "world_size": world}, out)
