"""medtvt core: hookspecs, registries, configs, the model classes, stages, the orchestrator.

After ``import medtvt_core``, transformers' ``AutoConfig`` / ``AutoModel`` know
``model_type="medtvt"``, so ``AutoModel.from_pretrained(<run>/<stage>/final)`` returns the model.
"""

import importlib.abc
import importlib.util
import sys

from .errors import MedtvtError
from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "MedtvtError", "__version__"]

# Registering needs transformers (and through it torch), which costs seconds to import; plugin
# modules import this package, and must stay cheap to import.  So the registration runs now if
# transformers' auto classes are already imported, else right after they are.
_AUTO = "transformers.models.auto"  # the package: registering while its modules import would be circular


def _register() -> None:
    # medtvt_core.model registers the classes when its import completes; when it is the import
    # that is loading transformers right now, it is in sys.modules already and will do so itself.
    if "medtvt_core.model" not in sys.modules:
        import importlib

        importlib.import_module("medtvt_core.model")


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta-path finder that lets ``_AUTO`` load as usual, then registers the medtvt classes."""

    def find_spec(self, fullname, path, target=None):  # noqa: D401
        if fullname != _AUTO:
            return None
        sys.meta_path.remove(self)  # find the real spec, once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()


if _AUTO in sys.modules:
    _register()
else:
    sys.meta_path.insert(0, _RegisterAfterImport())
