"""Random ProPainter weights in the official file layouts (raft-things.pth, recurrent_flow_completion.pth,
ProPainter.pth), for tests, benchmarks and the demo.

The networks are the real ones at full size with their own initialisation, so the files load through the same
code paths as the official downloads: ``raft-things.pth`` is a DataParallel state dict (every key starts with
``module.``), the other two are plain state dicts; all are ``torch.save`` of tensors only.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

from ..prior_propainter import FLOW_COMPLETION_FILE, GENERATOR_FILE, RAFT_FILE

DATAPARALLEL_PREFIX = "module."


def _batchnorm_statistics(module: torch.nn.Module, generator: torch.Generator) -> None:
    # Fresh BatchNorm layers hold mean 0 / var 1; give them plausible non-trivial statistics so eval-mode
    # normalisation is exercised like with trained weights.
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            layer.running_mean.normal_(0.0, 0.1, generator=generator)
            layer.running_var.uniform_(0.5, 1.5, generator=generator)
            layer.num_batches_tracked.fill_(1000)


def save_propainter_weights(directory, seed: int = 0) -> Dict[str, str]:
    """Write the three ProPainter files with random weights into ``directory``; returns ``{file name: path}``.

    Deterministic for a given ``seed``; the global torch RNG state is left as it was.
    """
    from ..models.flow_completion import RecurrentFlowCompleteNet
    from ..models.propainter import InpaintGenerator
    from ..models.raft import RAFT

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in (RAFT_FILE, FLOW_COMPLETION_FILE, GENERATOR_FILE)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        raft = RAFT()
        _batchnorm_statistics(raft, torch.Generator().manual_seed(seed))
        state = {DATAPARALLEL_PREFIX + key: value.clone() for key, value in raft.state_dict().items()}
        torch.save(state, paths[RAFT_FILE])
        del raft, state

        flow_completion = RecurrentFlowCompleteNet()
        torch.save({k: v.clone() for k, v in flow_completion.state_dict().items()}, paths[FLOW_COMPLETION_FILE])
        del flow_completion

        generator = InpaintGenerator(init_weights=True)
        torch.save({k: v.clone() for k, v in generator.state_dict().items()}, paths[GENERATOR_FILE])
    return paths
