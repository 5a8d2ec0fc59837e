"""The `quantkit` command line: the group; each command's click glue is in quantkit/commands/ (one module each).

Every user-facing failure is a QuantkitError, printed as one `error:` line with exit code 1; usage errors
exit 2 (click's convention), Ctrl-C exits 130.
"""

from __future__ import annotations

import sys

import click

from quantkit import __version__
from quantkit.commands.convert import convert
from quantkit.commands.eval import eval_command
from quantkit.commands.inspect import inspect
from quantkit.commands.quantize import quantize
from quantkit.commands.run import run_command
from quantkit.commands.serve import serve_command
from quantkit.commands.tokenize import tokenize
from quantkit.errors import QuantkitError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantkitError as e:
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except OSError as e:  # a full disk, a read-only folder, a vanished file: the path and the reason
            click.echo(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)
        except RecursionError:
            click.echo("error: input nested too deeply", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
def main() -> None:
    """quantkit: Mistral-native checkpoints -> Hugging Face layout -> quantized models that run on one GPU."""


main.add_command(convert)
main.add_command(inspect)
main.add_command(tokenize)
main.add_command(run_command)
main.add_command(eval_command)
main.add_command(quantize)
main.add_command(serve_command)
