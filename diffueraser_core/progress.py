"""Progress of a whole job: each stage reports its own count; this adds a ``job`` count of weighted units over all
stages, so a terminal can show one rate and ETA for the whole removal, not just for the stage running now.

Stage counts arrive as ``(stage, done, total)``. A stage may run more than once in a job (the VAE encodes the prior's
frames and then the BrushNet conditioning; both report ``encode``): a count that goes down again starts the
stage's next pass. Weights are the frames each pass touches, a sampling window counting its frames: a rough but
monotone measure of work whose ETA settles after the first stages.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional

#: the stage name the whole-job count is reported under
JOB_STAGE = "job"


class JobProgress:
    """Forwards every stage report to ``callback`` and follows it with ``callback("job", units, total_units)``.

    ``weights``: units of one pass of each stage; ``passes``: how many passes a stage makes (default 1). Stages not
    in ``weights`` are forwarded and add nothing to the job.
    """

    def __init__(self, callback: Optional[Callable], weights: Mapping[str, int],
                 passes: Optional[Mapping[str, int]] = None):
        self.callback = callback
        self.weights = {k: int(v) for k, v in weights.items() if v > 0}
        self.passes = {k: max(1, int((passes or {}).get(k, 1))) for k in self.weights}
        self.total = max(1, sum(self.weights[k] * self.passes[k] for k in self.weights))
        self._completed: Dict[str, int] = {}
        self._last: Dict[str, int] = {}
        self._units_reported = -1

    def units(self) -> int:
        done = 0.0
        for stage, weight in self.weights.items():
            done += weight * self._completed.get(stage, 0.0)
        return min(self.total, int(done))

    def __call__(self, stage: str, done: int, total: int, preview=None) -> None:
        if self.callback is not None:
            if preview is None:
                self.callback(stage, done, total)
            else:
                self.callback(stage, done, total, preview)
        if stage not in self.weights:
            return
        passes_before = self._completed.get(stage, 0.0)
        finished_passes = int(passes_before)
        last = self._last.get(stage)
        if last is not None and done < last and passes_before - finished_passes > 0:
            finished_passes += 1  # the count went down: a new pass of this stage began
        self._last[stage] = done
        fraction = min(1.0, done / max(1, total))
        self._completed[stage] = min(float(self.passes[stage]), max(passes_before, finished_passes + fraction))
        units = self.units()
        if self.callback is not None and units != self._units_reported:
            self._units_reported = units
            self.callback(JOB_STAGE, units, self.total)
