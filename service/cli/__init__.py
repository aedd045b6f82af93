"""The `tinyfleet` command line: one module per command group, loaded on first use."""

from __future__ import annotations

import importlib
import importlib.util

import click

# name -> "module:attribute". Loading lazily keeps `tinyfleet --help` fast (no torch import).
COMMANDS: dict[str, str] = {
    "up": "service.cli.stack:up",
    "down": "service.cli.stack:down",
    "status": "service.cli.stack:status",
    "demo": "service.cli.demo:demo",
    "mcus": "service.cli.mcus:mcus",
    "tokens": "service.cli.tokens:tokens",
    "devices": "service.cli.devices:devices",
    "models": "service.cli.models:models",
    "campaigns": "service.cli.campaigns:campaigns",
    "db": "service.cli.db:db",
    "plan": "service.cli.plan:plan",
    "compile": "service.cli.compile:compile_cmd",
    "verify": "service.cli.compile:verify",
    "onnx-ops": "service.cli.onnx_ops:onnx_ops",
    "train-supernet": "service.cli.search:train_supernet",
    "search": "service.cli.search:search",
    "finetune": "service.cli.finetune:finetune",
    "contributions": "service.cli.finetune:contributions",
    "personalize": "service.cli.personalize:personalize",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if _available(n))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not _available(cmd_name):
            return None
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


def _available(name: str) -> bool:
    module_name = COMMANDS[name].split(":")[0]
    return importlib.util.find_spec(module_name) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tinyfleet")
def main() -> None:
    """tinyfleet: deploy patch-scheduled int8 models to fleets of microcontrollers."""
