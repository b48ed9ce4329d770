"""The job's first phase: get the input's files — list a directory, resolve Meta's signed URL, stage its files
md5-verified into a directory or bucket, or write a synthetic checkpoint.

Flag parsing (rayconv.cli.options) only says *what* to acquire (:class:`Acquisition`, in
``ConvertOptions.acquire``); the job does it (:func:`acquire`, called by the driver before it indexes the input,
and by ``rayconv plan``), so an 810 GB download is a phase of the run — timed as ``acquire``, under the run's
error handling and its tunables — not a side effect of reading the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from rayconv.progress import LOG, human_bytes
from rayconv.tunables import Tunables

Options = TypeVar("Options")


@dataclasses.dataclass(frozen=True)
class Acquisition:
    """Where the input comes from, exactly one of ``input_directory``, ``meta_url`` (with ``model_path``; staged
    into ``download_directory`` when given) or ``synthetic`` (a preset of rayconv.synthetic, cached under
    ``cache``). Plain data: nothing is read or written until :meth:`files` runs."""

    input_directory: str | None = None
    meta_url: str | None = dataclasses.field(default=None, repr=False)  # carries the URL's signature
    model_path: str | None = None
    download_directory: str | None = None
    synthetic: str | None = None
    cache: str | None = None

    def files(self, knobs: Tunables) -> tuple[dict[str, str], str]:
        """→ ({file name: uri}, how to name the input to the user)."""
        from rayconv.source.checkpoint import list_input

        if self.synthetic:
            from pathlib import Path

            from rayconv import synthetic as syn

            model = syn.PRESETS[self.synthetic]
            cache = Path(self.cache or Path.home() / ".cache" / "rayconv") / "synthetic"
            LOG.info("Preparing synthetic %s checkpoint (%s) in %s", self.synthetic, human_bytes(model.nbytes()), cache)
            directory = str(syn.ensure_checkpoint(model, cache))
            return list_input(directory), directory
        if self.meta_url and self.download_directory:
            from rayconv.staging import stage

            staged = str(stage(self.meta_url, self.model_path, self.download_directory,
                               published_sizes=knobs.meta_shard_sizes))
            return list_input(staged), staged
        if self.meta_url:
            from rayconv import download
            from rayconv.source.http import redact

            files = download.resolve_input(self.meta_url, self.model_path, published_sizes=knobs.meta_shard_sizes)
            return files, f"{redact(self.meta_url)} ({self.model_path})"
        return list_input(self.input_directory), self.input_directory


def acquire(options: Options) -> Options:
    """``options`` with ``files`` and ``input_display`` filled in from ``options.acquire`` (which is then None);
    ``options`` itself when there is nothing to acquire."""
    what: Any = options.acquire  # type: ignore[attr-defined]
    if what is None:
        return options
    files, display = what.files(options.tunables)  # type: ignore[attr-defined]
    return dataclasses.replace(options, files=files, input_display=display, acquire=None)  # type: ignore[type-var]
