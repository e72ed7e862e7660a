"""``lungsam`` command line. Each layer defines its commands in ``<layer>/commands.py``, whose
module level imports only click, so ``lungsam predict`` never loads torch."""
from __future__ import annotations

import click

from .benchmarks.commands import bench, bench_train
from .export.commands import export
from .node.commands import node
from .runtime.commands import predict, verify
from .reproduce.commands import reproduce
from .train.commands import compare, eval_cmd, train, train_unet, weights


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lungsam")
def main() -> None:
    """Segment Anything for lung segmentation in chest X-rays: train, export, predict, bench."""


for _cmd in (train, train_unet, eval_cmd, compare, weights, reproduce, export, predict, verify, bench, bench_train,
             node):
    main.add_command(_cmd)
