"""``lungsam node``; module level imports only click and :mod:`lungsam.options` (the work lives in
:mod:`lungsam.node.service`)."""
from __future__ import annotations

import click

from ..options import Command, examples, verbosity


@click.command("node", cls=Command, extra="dicom", epilog=examples(
    "lungsam node --config /etc/lungsam/node.toml --check",
    "lungsam node --config /etc/lungsam/node.toml"))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=str),
              help="node.toml: [listen], [model], [[destinations]], [retry], work_dir (docs/pacs.md).")
@click.option("--check", is_flag=True,
              help="Validate the config, open the bundle and reach every destination (C-ECHO / QIDO-RS), then exit "
                   "(code 1 when anything fails).")
@verbosity
def node(config_path: str, check: bool, quiet: int) -> None:
    """Run a DICOM node: receive chest radiographs (C-STORE), segment them in arrival order, send DICOM-SEG / SR
    to the configured destinations. Ctrl-C or SIGTERM stops it; a restart resumes the spool and the outbox."""
    try:
        import highdicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"lungsam node needs lungsam[dicom] ({e.name} is missing): "
                                   "pip install 'lungsam[dicom]'") from e
    from .config import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e
    if check:
        from .service import run_check

        ok = run_check(config, log=lambda m: click.echo(m))
        raise SystemExit(0 if ok else 1)
    from .service import run_node

    try:
        run_node(config, log=lambda m: click.echo(m, err=True))
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from e
