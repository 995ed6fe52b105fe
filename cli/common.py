"""Pieces shared by the command modules: the error-handling group and the config options."""

from __future__ import annotations

import functools
import traceback
from typing import Any

import click

from medtvt_core.build import validate_run
from medtvt_core.config import resolve_config
from medtvt_core.errors import MedtvtError


#: Set by commands run with ``-v``: an error then also prints its traceback (e.g. inside a plugin).
VERBOSE = False


class _Group(click.Group):
    """A click group that turns :class:`MedtvtError` into one line and exit code 2 (the traceback too
    under ``-v``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MedtvtError as err:
            if VERBOSE:
                click.echo("".join(traceback.format_exception(err)).rstrip(), err=True)
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)
        except click.UsageError as err:
            # click's usage block is three lines; keep bad input to one (what, where, what is allowed)
            where = err.ctx.command_path if err.ctx is not None else ctx.command_path
            click.echo(f"error: {err.format_message()} (see {where} --help)", err=True)
            ctx.exit(err.exit_code)


def config_options(f: Any) -> Any:
    """Options shared by every command that resolves a RunConfig.  ``--on-bad-sample`` reaches the
    command as the ``--set data.on_bad_sample=...`` it stands for (before the explicit ``--set``s)."""

    @functools.wraps(f)
    def wrapper(*args: Any, on_bad_sample: str | None = None, sets: tuple[str, ...] = (), **kwargs: Any) -> Any:
        if on_bad_sample:
            sets = (f"data.on_bad_sample={on_bad_sample}", *sets)
        return f(*args, sets=sets, **kwargs)

    opts = [
        click.option("--preset", help="Start from a preset: demo, study or paper."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML or TOML config file."),
        click.option("--fusion", help="Fusion plugin: mpl, cmha, cao, none, ..."),
        click.option("--modalities", help="Comma list, e.g. ecg,lab (others are treated as absent)."),
        click.option("--rewards", help="Comma list of reward plugins, e.g. format,jaccard."),
        click.option("--stages", help="Comma list from pt,sft,rft."),
        click.option("--out", "output_dir", type=click.Path(file_okay=False), help="Run directory."),
        click.option("--on-bad-sample", type=click.Choice(["skip", "fail"]),
                     help="A sample whose file is missing or unreadable: skip it (counted and logged with its "
                          "reason) or fail the run (default: the config's data.on_bad_sample)."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any field, e.g. --set rft.num_generations=4 (repeatable)."),
    ]
    for o in reversed(opts):
        wrapper = o(wrapper)
    return wrapper


def resolve_from_cli(*, preset=None, config_file=None, fusion=None, modalities=None, rewards=None, stages=None,
                     output_dir=None, sets=(), default_preset=None, validate: bool = True):
    """The run configuration of the command line; ``validate``: check its plugins here (commands that
    hand it to a ``Run`` pass False: the run validates it, once, before any work)."""
    if not preset and not config_file:
        preset = default_preset
    cfg = resolve_config(preset=preset, config_file=config_file, fusion=fusion, modalities=modalities,
                         rewards=rewards, stages=stages, output_dir=output_dir, sets=list(sets))
    if validate:
        validate_run(cfg)
    return cfg
