"""AdvBCT (Pan et al., CVPR 2023; code Ashespt/AdvBCT) as a compatzoo loss: an adversarial
term that makes new embeddings indistinguishable from old ones, plus a constraint that
keeps each new embedding inside its class's (elastic) boundary in the old space."""

from compatzoo_advbct.loss import (AdvBCTLoss, AdvBCTParams, ClassBoundaries, class_boundaries,
                                   discriminator, grl_coefficient, reverse_gradient)

__all__ = ["AdvBCTLoss", "AdvBCTParams", "ClassBoundaries", "class_boundaries", "discriminator",
           "grl_coefficient", "reverse_gradient"]
