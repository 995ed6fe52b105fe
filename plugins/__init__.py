"""Built-in medtvt plugins.

They are registered through the ``medtvt`` entry-point group of this distribution, the same
path third-party plugins take.  ``BUILTIN_PLUGINS`` lists them (entry-point name -> module);
``tests/test_plugins.py`` checks it equals the entry points declared in ``pyproject.toml``.
"""

BUILTIN_PLUGINS = (
    ("ecg", "medtvt_plugins.readers.ecg"),
    ("cxr", "medtvt_plugins.readers.cxr"),
    ("lab", "medtvt_plugins.readers.lab"),
    ("ecgfm-ked", "medtvt_plugins.encoders.ecgfm_ked"),
    ("vit", "medtvt_plugins.encoders.vit"),
    ("symile", "medtvt_plugins.encoders.symile"),
    ("fusion", "medtvt_plugins.fusion.builtin"),
    ("rewards", "medtvt_plugins.rewards.builtin"),
    ("llama-lora", "medtvt_plugins.llms.llama_lora"),
)
