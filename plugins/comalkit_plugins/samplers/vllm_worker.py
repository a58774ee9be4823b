"""Methods comalkit adds to every vLLM worker (``LLM(worker_extension_cls=...)``).

vLLM runs its workers in separate processes; these methods are called by name through
``LLM.collective_rpc``, so no code has to be pickled across. This module must stay cheap to
import and must not import vLLM at the top: the plugin loader imports it in every process.
"""

from __future__ import annotations


class ComalkitWorkerExtension:
    """Per-call reseeding for :mod:`comalkit_plugins.samplers.vllm`."""

    def comalkit_reseed(self, seed: int) -> None:
        """Seed the worker's global generators: vLLM draws every request's noise from them
        (a per-request seed crashes the CPU worker), so this fixes one ``generate`` call's draws."""
        import random

        import numpy as np
        import torch

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # every device's default generator too
