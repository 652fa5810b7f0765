"""BiCT (bidirectional compatible training, Su et al. 2022) for compatzoo: the feature
upgrade MLP psi (step 2) and the momentum input of sequential upgrades (eq. 9). Step 1
is the ``cosine`` compatibility loss of compatzoo-bct."""

from compatzoo_bict.sequential import momentum_input
from compatzoo_bict.upgrader import BiCTMLP, BiCTMLPParams

__all__ = ["BiCTMLP", "BiCTMLPParams", "momentum_input"]
