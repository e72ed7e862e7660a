"""``lungsam`` command line. Each layer defines its commands in ``<layer>/commands.py``, whose
module level imports only click and :mod:`lungsam.options` (click + torch-free helpers), so
``lungsam predict`` never loads torch.

Errors: every command is a :class:`lungsam.options.Command`, whose one handler turns a
:class:`lungsam.errors.LungsamError` into ``error: <message>`` and exit code 1 (a failure) or 2 (an option
this run cannot take, like click's usage errors); a missing optional dependency of a command becomes the
extra to install (:data:`lungsam.options.EXTRAS`); anything else is a programming error and keeps its
traceback.
"""
from __future__ import annotations

import click

from . import __version__
from .benchmarks.commands import bench, bench_train
from .export.commands import export
from .node.commands import node
from .options import Group
from .reproduce.commands import reproduce
from .runtime.commands import predict, qc_site, verify
from .train.commands import compare, eval_cmd, train, train_unet, weights


@click.group(cls=Group)
@click.version_option(__version__, package_name="lungsam", prog_name="lungsam")
def main() -> None:
    """Segment Anything for lung segmentation in chest X-rays: train, export, predict, bench.

    Exit codes: 0 done, 1 the work failed (the message says why), 2 a usage error (an option refused).
    """


for _cmd in (train, train_unet, eval_cmd, compare, weights, reproduce, export, predict, qc_site, verify, bench,
             bench_train, node):
    main.add_command(_cmd)
