"""``lungsam node``; module level imports only click and :mod:`lungsam.options` (the work lives in
:mod:`lungsam.node.service`). Errors go through the one handler of :class:`lungsam.options.Command`: a bad
config (:class:`lungsam.node.config.ConfigError`) or bundle is one ``error:`` line and exit 1, a missing
``lungsam[dicom]`` names the extra."""
from __future__ import annotations

import click

from ..errors import LungsamError
from ..options import Command, examples, log_to, verbosity


class NodeStartError(LungsamError, OSError):
    """The node could not start or keep running (a port in use, a work folder it cannot write)."""


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
    import highdicom  # noqa: F401  (a missing lungsam[dicom] is named before the config is read)
    import pynetdicom  # noqa: F401

    from .config import load_config

    config = load_config(config_path)
    if check:  # the check's lines are the command's result: stdout
        from .service import run_check

        ok = run_check(config, log=click.echo)
        raise SystemExit(0 if ok else 1)
    from .service import run_node

    try:
        run_node(config, log=log_to("node"))
    except OSError as e:
        raise NodeStartError(str(e)) from e
