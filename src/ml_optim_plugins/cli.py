"""Console entry of ``ml-optim-plugins``: ``fit|validate|test|predict -c recipes/NAME.yaml`` go to the recipe CLI
(:class:`~ml_optim_plugins.recipe_cli.MultimodalCLI`, built on LightningCLI), ``baselines -c recipes/NAME.yaml`` to
:func:`~ml_optim_plugins.baselines.run_baselines`.

The top of the package's layers (docs/architecture.md): this module may import any other, and no module of the package
imports it. The recipe CLI's names stay importable from here.
"""

from __future__ import annotations

import os
import sys

from ml_optim_plugins.cli_errors import exit_with_short_errors
from ml_optim_plugins.process_group import destroy_default_process_group
from ml_optim_plugins.recipe_cli import (
    LINKED_MODEL_ARGS,
    SYMBOLIC_CKPT_PATHS,
    MultimodalCLI,
    ResumedMetricRows,
    align_logger_versions,
    check_fit_trains,
    check_image_preprocessing,
    format_metric,
    print_run_summary,
    resume_in_run_directory,
    run,
)

__all__ = [
    "LINKED_MODEL_ARGS",
    "SYMBOLIC_CKPT_PATHS",
    "MultimodalCLI",
    "ResumedMetricRows",
    "align_logger_versions",
    "check_fit_trains",
    "check_image_preprocessing",
    "format_metric",
    "main",
    "print_run_summary",
    "resume_in_run_directory",
    "run",
]


@exit_with_short_errors
def main(args: list[str] | None = None) -> None:
    """Entry point of the ``ml-optim-plugins`` console script (``baselines`` goes to
    :func:`~ml_optim_plugins.baselines.run_baselines`, everything else to LightningCLI).

    A DDP run ends by destroying its process group (:func:`~ml_optim_plugins.process_group.destroy_default_process_group`), so the
    process does not abort at exit; after an error the group is left alone and the error propagates. An error the
    library raised on purpose (a bad value, a missing file) is printed as one line (exit status 1); set
    ``JSONARGPARSE_DEBUG=true`` for the full traceback.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["baselines"]:
        from ml_optim_plugins.baselines import run_baselines

        run_baselines(argv[1:])
    else:
        run(args)
    destroy_default_process_group()


if __name__ == "__main__":
    main()
