"""The soft MD-LSM, the differentiable surrogate of the MD-LSM degree (docs/loss.md).

* :mod:`.api` — the public functions :func:`soft_md_lsm`, :func:`fisher_directions`,
  :func:`soft_pair_score`;
* :mod:`.layout` — :class:`LabelLayout`, the classes of a batch, owned by the caller;
* :mod:`.static` — the static, sync-free path (``num_classes=K``), batched over layers;
* :mod:`.fused` — the fused in-sample autograd node (CPU default);
* :mod:`.reference` — the recorded-autograd reference; :mod:`.counts` its blocked soft counts;
* :mod:`.linalg` — SPD solves; :mod:`.options` — validation.
"""

from lsm_train._validation import SCHEMES
from lsm_train.measures.soft.api import fisher_directions, soft_md_lsm, soft_pair_score
from lsm_train.measures.soft.layout import LabelLayout
from lsm_train.measures.soft.static import static_scores

__all__ = [
    "SCHEMES", "LabelLayout", "fisher_directions", "soft_md_lsm", "soft_pair_score",
    "static_scores",
]
