"""The `procurator` command. `main()` is the one place errors become `error: ...` and an exit code."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    from procurator.cli import listing  # noqa: PLC0415 - before Click, which a plain `ps` does not need

    if listing.answer(args):
        return 0
    return _run(args)


def _run(args: list[str]) -> int:
    """The Click command (everything but `ps` answered by a worker)."""
    import traceback  # noqa: PLC0415 - see main

    import click  # noqa: PLC0415

    from procurator.cli.app import cli  # noqa: PLC0415
    from procurator.errors import EXIT_FAILURE, EXIT_USAGE, ProcuratorError  # noqa: PLC0415

    debug = "--debug" in args
    setup_logging(debug)
    try:
        rv = cli.main(args=args, prog_name="procurator", standalone_mode=False)
    except ProcuratorError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc.message}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        return EXIT_FAILURE
    except click.UsageError as exc:
        hint = f" (see `procurator {exc.ctx.command_path.partition(' ')[2]} --help`)" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}".replace("  ", " "), err=True)
        return EXIT_USAGE
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


def setup_logging(debug: bool) -> None:
    """Warnings (with --debug, everything) on stderr as `logger: message`, for every command."""
    import logging  # noqa: PLC0415 - see main

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(name)s: %(message)s")


if __name__ == "__main__":
    sys.exit(main())
