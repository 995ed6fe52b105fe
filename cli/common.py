"""Pieces shared by the command modules: the error-handling group and the config options."""

from __future__ import annotations

from typing import Any

import click

from medtvt_core.errors import MedtvtError


class _Group(click.Group):
    """A click group that turns :class:`MedtvtError` into one line and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MedtvtError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)


def config_options(f: Any) -> Any:
    """Options shared by every command that resolves a RunConfig."""
    opts = [
        click.option("--preset", help="Start from a preset: demo or paper."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML or TOML config file."),
        click.option("--fusion", help="Fusion plugin: mpl, cmha, cao, none, ..."),
        click.option("--modalities", help="Comma list, e.g. ecg,lab (others are treated as absent)."),
        click.option("--rewards", help="Comma list of reward plugins, e.g. format,jaccard."),
        click.option("--stages", help="Comma list from pt,sft,rft."),
        click.option("--out", "output_dir", type=click.Path(file_okay=False), help="Run directory."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any field, e.g. --set rft.num_generations=4 (repeatable)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def resolve_from_cli(preset, config_file, fusion, modalities, rewards, stages, output_dir, sets, *, default_preset=None):
    from medtvt_core.config import resolve_config, validate_plugins

    if not preset and not config_file:
        preset = default_preset
    cfg = resolve_config(preset=preset, config_file=config_file, fusion=fusion, modalities=modalities,
                         rewards=rewards, stages=stages, output_dir=output_dir, sets=list(sets))
    validate_plugins(cfg)
    return cfg
