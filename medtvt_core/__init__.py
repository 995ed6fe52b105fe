"""medtvt core: hookspecs, registries, configs, the model classes, stages, the orchestrator.

After ``import medtvt_core``, transformers' ``AutoConfig`` / ``AutoModel`` know
``model_type="medtvt"``, so ``AutoModel.from_pretrained(<run>/<stage>/final)`` returns the model.
"""

import importlib.abc
import importlib.machinery
import sys

from .errors import MedtvtError
from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "MedtvtError", "__version__"]

# Registering needs transformers (and through it torch), which costs seconds to import, while plugin
# modules import this package and must stay cheap to import.  So the registration runs now if
# transformers' auto classes are already imported, else as soon as they are and no transformers
# module is half-initialised (registering from inside transformers' own import chain would be a
# circular import).
_AUTO = "transformers.models.auto"


def _initialising(skip: str = "") -> bool:
    return any(getattr(getattr(m, "__spec__", None), "_initializing", False)
               for n, m in list(sys.modules.items()) if n.startswith("transformers") and n != skip)


def _register() -> None:
    # medtvt_core.model registers the classes when its import completes.
    if "medtvt_core.model" not in sys.modules:
        importlib.import_module("medtvt_core.model")


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Lets transformers' modules load as usual and registers medtvt's classes after the first one
    that completes once ``transformers.models.auto`` is loaded and nothing of transformers is mid-import."""

    def __init__(self) -> None:
        self._loaders: dict[str, importlib.abc.Loader] = {}
        self._busy = False

    def find_spec(self, fullname, path, target=None):  # noqa: D401
        if self._busy or not fullname.startswith("transformers"):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        self._loaders[fullname] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module):
        self._loaders.pop(module.__name__).exec_module(module)
        if self._busy or _AUTO not in sys.modules or _initialising(skip=module.__name__):
            return
        self._busy = True
        try:
            _register()
        finally:
            self._busy = False
        if self in sys.meta_path:
            sys.meta_path.remove(self)


if _AUTO in sys.modules and not _initialising():
    _register()
else:
    sys.meta_path.insert(0, _RegisterAfterImport())
