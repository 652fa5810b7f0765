"""FCT (forward compatible training, Ramanujan et al. CVPR 2022) for compatzoo:
side-information models trained on old data, the transformation h(phi_old, psi) and the
side transformation g for chains of updates, and linear CKA (sec. 5.3)."""

from compatzoo_fct.cka import linear_cka
from compatzoo_fct.side_info import SIDE_INFORMATION, SideInformation, SideModelParams, nt_xent
from compatzoo_fct.transformation import FCTNet, FCTParams, FCTSideTransformation, FCTTransformation

__all__ = ["FCTNet", "FCTParams", "FCTSideTransformation", "FCTTransformation",
           "SIDE_INFORMATION", "SideInformation", "SideModelParams", "linear_cka", "nt_xent"]
