"""Beam pipeline options from the user's own command-line arguments.

The embedded default is Beam's in-process ``FnApiRunner``: ``DirectRunner`` first tries to
download Prism (a Go binary) at run time, which an offline laptop cannot do. Everything the
user passes — ``--runner DataflowRunner --project ... --region ... --temp_location ...``, Flink or
Spark options — goes to Beam untouched, so the same jobs scale out without code changes.
"""

from __future__ import annotations

from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

DEFAULT_RUNNER = "FnApiRunner"
LOCAL_RUNNERS = {"FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "PrismRunner"}


def _has_runner(argv: Sequence[str]) -> bool:
    return any(arg == "--runner" or arg.startswith("--runner=") for arg in argv)


def build_pipeline_options(beam_args: Sequence[str] | None = None, **overrides: object) -> PipelineOptions:
    """``PipelineOptions`` from extra argv; ``--runner=FnApiRunner`` unless the user names a runner.

    ``overrides`` are keyword options set programmatically (e.g. ``save_main_session=False``);
    they are handed to ``PipelineOptions`` together with the argv.
    """
    argv = list(beam_args or [])
    if not _has_runner(argv):
        argv = [f"--runner={DEFAULT_RUNNER}", *argv]
    return PipelineOptions(argv, **overrides)


def runner_name(options: PipelineOptions) -> str:
    """The runner's name as given (a string) or its class name (a runner object)."""
    runner = options.view_as(StandardOptions).runner
    return runner if isinstance(runner, str) or runner is None else type(runner).__name__


def is_local_runner(options: PipelineOptions) -> bool:
    """True for runners that execute in (or beside) this process and can see its local files."""
    name = runner_name(options) or DEFAULT_RUNNER
    return name in LOCAL_RUNNERS or name.endswith("FnApiRunner")
