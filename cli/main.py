"""The ``medtvt`` command line.

Every user-input problem (unknown plugin, bad config value, broken file) ends in one line
``error: ...`` on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from pathlib import Path

import click

from medtvt_core.config import dump_config, preset_names
from medtvt_core.plugin_calls import describe
from medtvt_core.plugins import get_catalog
from medtvt_core.scaffold import new_plugin
from medtvt_core.testing.checks import check_plugin

from .common import _Group, config_options, resolve_from_cli


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="medtvt")
def cli() -> None:
    """medtvt: multimodal medical reasoning with LLMs (MedTVT-R1), built from plugins.

    \b
    Start here:
      medtvt run --preset demo            train PT -> SFT -> RFT and evaluate on a synthetic cohort
      medtvt plugins list                 encoders, fusion layers, rewards, LLMs installed
      medtvt config show --preset paper   the paper's settings, with overrides applied
    """


# ----------------------------------------------------------------------------- plugins
@cli.group(cls=_Group)
def plugins() -> None:
    """Inspect installed plugins (entry-point group ``medtvt``)."""


@plugins.command("list")
@click.option("--kind", type=click.Choice(["modalities", "encoders", "fusion", "rewards", "llms"]), help="Only this kind.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_list(kind: str | None, as_json: bool) -> None:
    """List registered plugins by kind, with the distribution that ships each."""
    cat = get_catalog()
    data = cat.as_dict()
    if kind:
        data = {kind: data[kind], "failures": data["failures"]}
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        shown = [(k, reg) for k, reg in cat.registries.items() if not kind or k == kind]
        specs = [s for _, reg in shown for s in reg.specs()]
        w_name = max([len(s.name) for s in specs] + [14])  # columns fit the longest name and distribution
        w_dist = max([len(s.dist) for s in specs] + [16])
        for k, reg in shown:
            click.echo(f"{k}:")
            for spec in reg.specs():
                click.echo(f"  {spec.name:<{w_name}} {spec.dist:<{w_dist}} {spec.description}")
    # Broken plugins are reported (stderr) but do not hide the working ones.
    for f in cat.failures:
        click.echo(f"warning: {f}", err=True)


@plugins.command("check")
@click.argument("kind", type=click.Choice(["modalities", "encoders", "fusion", "rewards", "llms"]))
@click.argument("name")
def plugins_check(kind: str, name: str) -> None:
    """Run the contract checks of KIND on plugin NAME; exit 1 on violations.

    The checks are the kit's (medtvt_core.testing, docs/plugins.md); warnings (e.g. a slow import)
    do not fail. A plugin that failed to import is an error with its cause."""
    spec = get_catalog()[kind].spec(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = check_plugin(spec)
    for w in caught:
        if issubclass(w.category, UserWarning) and "medtvt" in type(w.message).__module__:
            click.echo(f"warning: {w.message}", err=True)
    for p in problems:
        click.echo(f"FAIL {kind}/{name}: {p}")
    if problems:
        click.echo(f"{len(problems)} problem(s) in {describe(spec)}", err=True)
        sys.exit(1)
    click.echo(f"ok {kind}/{name}: contract satisfied ({describe(spec)})")


@plugins.command("new")
@click.argument("kind", type=click.Choice(["modality", "encoder", "fusion", "reward", "llm"]))
@click.argument("name")
@click.option("--out", "out", type=click.Path(file_okay=False), help="Directory to write (default: ./medtvt-NAME).")
def plugins_new(kind: str, name: str, out: str | None) -> None:
    """Write a ready plugin distribution: pyproject.toml with the entry point, the plugin module and a
    contract test. Then: pip install -e DIR; pytest DIR; medtvt run --preset demo (see its README.md)."""
    d = new_plugin(kind, name, Path(out) if out else None)
    click.echo(f"wrote {d} (pip install -e {d}, then pytest {d}; usage in {d / 'README.md'})")


# ----------------------------------------------------------------------------- config
@cli.group(cls=_Group)
def config() -> None:
    """Show and check run configurations."""


@config.command("show")
@config_options
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
def config_show(preset, config_file, fusion, modalities, rewards, stages, output_dir, sets, as_json) -> None:
    """Print the resolved configuration (preset < file < flags < --set)."""
    cfg = resolve_from_cli(preset=preset, config_file=config_file, fusion=fusion, modalities=modalities, rewards=rewards,
                           stages=stages, output_dir=output_dir, sets=sets, default_preset="demo")
    click.echo(cfg.model_dump_json(indent=2) if as_json else dump_config(cfg), )


@config.command("presets")
def config_presets() -> None:
    """List the shipped presets."""
    for n in preset_names():
        click.echo(n)


def _add_optional_commands() -> None:
    """Attach command groups that live in their own modules (data, run, eval, ...)."""
    for module, attr in (("medtvt_cli.data", "data_group"), ("medtvt_cli.run", "COMMANDS")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        obj = getattr(mod, attr)
        for cmd in obj if isinstance(obj, (list, tuple)) else [obj]:
            cli.add_command(cmd)


_add_optional_commands()


def main() -> None:
    cli(prog_name="medtvt")


if __name__ == "__main__":
    main()
