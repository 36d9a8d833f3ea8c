"""Face recognition at scale: margins and the class-sharded Partial FC head.

``PartialFC`` keeps one class shard per rank and computes the exact margin softmax over all
shards; ``PartialFCSGD``/``PartialFCAdamW`` step only the rows a window sampled; ``reshard``
cuts a checkpoint for another world size; ``fc_memory`` sizes it for ``largebatch plan``.
"""
from largebatch.face.margins import ArcFace, CombinedMargin, CosFace
from largebatch.face.optim import PartialFCAdamW, PartialFCSGD
from largebatch.face.partial_fc import PartialFC
from largebatch.face.shards import expected_positive_share, fc_memory, reshard, shard_range

__all__ = ["ArcFace", "CombinedMargin", "CosFace", "PartialFC", "PartialFCAdamW",
           "PartialFCSGD", "expected_positive_share", "fc_memory", "reshard", "shard_range"]
