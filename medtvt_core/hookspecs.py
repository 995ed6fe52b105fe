"""Hook specifications of medtvt plugins.

A plugin is a module (or object) named by an entry point of the ``medtvt`` group that
implements one or more of these hooks.  Each hook receives a ``register`` callable::

    from medtvt_core import hookimpl

    @hookimpl
    def medtvt_register_rewards(register):
        register("length", length_reward)

``register(name, obj, config=None, description=None)`` adds ``obj`` under ``name`` to the
registry of that kind; ``config`` is the plugin's pydantic config model (``extra="forbid"``)
whose fields are the keyword arguments of ``obj``. Rewards also take ``range=(lo, hi)`` (default
``(0.0, 1.0)``, ``None`` for an unbounded side). The guide: docs/plugins.md.
"""

from __future__ import annotations

import pluggy

PROJECT = "medtvt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def medtvt_register_modalities(register):
    """Register :class:`medtvt_core.contracts.ModalityReader` subclasses (readers of one input kind)."""


@hookspec
def medtvt_register_encoders(register):
    """Register :class:`medtvt_core.contracts.Encoder` subclasses."""


@hookspec
def medtvt_register_fusion(register):
    """Register :class:`medtvt_core.contracts.Fusion` subclasses."""


@hookspec
def medtvt_register_rewards(register):
    """Register reward functions ``(prompts, completions, **kwargs) -> list[float | None]``."""


@hookspec
def medtvt_register_llms(register):
    """Register :class:`medtvt_core.contracts.LLMBackbone` subclasses."""
