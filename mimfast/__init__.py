"""mimfast: fast masked-image-modeling (MAE, BEiT) pretraining on Triton kernels.

Layers (each imports only from those below it): ``mimfast.kernels`` (Triton) ->
``mimfast.ops`` (autograd Functions, eager references, dispatch) -> ``mimfast.nn`` ->
``mimfast.models`` -> ``mimfast.data`` / ``mimfast.train`` / ``mimfast.cli``.
"""

from mimfast import ops
from mimfast.backend import BackendUnavailableError, use_backend
from mimfast.nn import patch_timm, patch_timm_mlp

__version__ = "0.1.0"

__all__ = ["ops", "patch_timm", "patch_timm_mlp", "use_backend", "BackendUnavailableError", "__version__"]
