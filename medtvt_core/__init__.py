"""medtvt core: hookspecs, registries, configs, model assembly, stages, orchestrator."""

from .hookspecs import hookimpl
from .errors import MedtvtError

__version__ = "0.1.0"
__all__ = ["hookimpl", "MedtvtError", "__version__"]
