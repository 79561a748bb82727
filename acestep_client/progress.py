"""A job's progress on the terminal: place in line and ETA while queued, then stage and diffusion step."""

from __future__ import annotations

import sys
from typing import Callable, TextIO, Union

from tqdm import tqdm

from jobs.schemas import JobView

ProgressCallback = Callable[[JobView], None]
Progress = Union[bool, ProgressCallback]  # True: a bar on stderr; a callable: called with every view seen

_QUEUED_FORMAT = "{desc} [{elapsed}{postfix}]"
_RUNNING_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]"


class ProgressBar:
    """A tqdm bar fed `JobView`s: `queued #3, starts in ~12s`, then `diffusion: 40%|████| 4/10 steps`."""

    def __init__(self, job_id: str, file: TextIO | None = None):
        self.job_id = job_id
        self.bar = tqdm(total=None, desc=f"{job_id[:8]} submitted", file=file or sys.stderr, leave=True,
                        bar_format=_QUEUED_FORMAT, dynamic_ncols=True)

    def __call__(self, view: JobView) -> None:
        progress = view.progress
        if view.status == "queued":
            eta = f", starts in ~{view.eta_seconds:.0f}s" if view.eta_seconds is not None else ""  # the server's ETA
            self.bar.bar_format = _QUEUED_FORMAT
            self.bar.set_description_str(f"{self.job_id[:8]} queued #{view.queue_position}{eta}", refresh=False)
        elif view.status == "running":
            self.bar.bar_format = _RUNNING_FORMAT
            total = progress.total if progress is not None and progress.total else self.bar.total
            if total != self.bar.total:
                self.bar.total = total
            self.bar.n = progress.step if progress is not None else 0
            self.bar.set_description_str(f"{self.job_id[:8]} {progress.stage if progress else 'running'}",
                                         refresh=False)
        else:
            if view.status == "succeeded" and self.bar.total:
                self.bar.n = self.bar.total
            self.bar.set_description_str(f"{self.job_id[:8]} {view.status}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _Callback:
    def __init__(self, callback: ProgressCallback):
        self.callback = callback

    def __call__(self, view: JobView) -> None:
        self.callback(view)

    def close(self) -> None:
        pass


def progress_display(progress: Progress, job_id: str) -> ProgressBar | _Callback | None:
    if callable(progress):
        return _Callback(progress)
    return ProgressBar(job_id) if progress else None
