"""An example plug-in method: the fused CE plus `weight` times each modality's own CE.

Run it without editing avbalance:

    avtrain fit --method-module examples/unimodal_aux.py --method unimodal_aux \
        --unimodal-aux-weight 0.5 --shards OUT --run-dir RUN

Each modality's logits are its share of the fused layer (`logits["audio"]`, ...), so its CE
trains that encoder on its own as well -- a simple way to keep the weak modality learning.
It is not from a paper; it is here to show the interface (avtrain/balance/base.py): declare the
options, override a hook, log a signal.
"""

import torch.nn.functional as F

from avtrain.balance import Balancer, Option


class UnimodalAux(Balancer):
    """Fused CE + weight · Σ_m CE(logits_m)."""

    name = "unimodal_aux"
    title = "auxiliary unimodal CE (example plug-in)"
    summary = "adds weight x each modality's own CE to the fused CE"
    signals = ("aux_audio", "aux_visual")
    options = (Option("weight", float, 1.0, "weight of each modality's own CE", minimum=0),)

    def loss(self, logits, labels, *, epoch, step):
        fused = F.cross_entropy(logits["fused"].float(), labels)
        own = {m: F.cross_entropy(logits[m].float(), labels) for m in self.modalities}
        self._signal = {f"aux_{m}": value.detach() for m, value in own.items()}
        return fused + self.opt.weight * sum(own.values())

    def step_metrics(self):
        return getattr(self, "_signal", {})
