"""kfopt: fused Triton kernels for second-order and large-batch optimizers."""

from .heavy_ball import HeavyBall
from .kfac import KFAC, KFACPreconditioner
from .lamb import LAMB
from .lars import LARS
from .mkor import MKOR, MKORH, MKORPreconditioner
from .param_groups import param_groups
from .singd import SINGD, SINGDPreconditioner
from .sonew import SONew

__version__ = "0.1.0"

__all__ = ["HeavyBall", "KFAC", "KFACPreconditioner", "LAMB", "LARS", "MKOR", "MKORH", "MKORPreconditioner", "SINGD",
           "SINGDPreconditioner", "SONew", "param_groups"]
