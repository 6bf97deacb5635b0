"""The whole-job count (progress.JobProgress) and how the CLI shows it."""

import io

from diffueraser_core.cli import _ProgressPrinter
from diffueraser_core.progress import JOB_STAGE, JobProgress


def test_job_units_follow_weighted_stages_and_repeated_passes():
    seen = []
    job = JobProgress(lambda *a: seen.append(a[:3]), {"prior": 10, "encode": 10, "decode": 20}, passes={"encode": 2})
    assert job.total == 10 + 2 * 10 + 20
    for stage, done, total in [("prior", 5, 10), ("encode", 4, 10), ("prior", 10, 10), ("encode", 10, 10),
                               ("encode", 3, 10), ("encode", 10, 10), ("windows", 1, 2), ("decode", 20, 20)]:
        job(stage, done, total)
    units = [d for s, d, t in seen if s == JOB_STAGE]
    # each stage report is forwarded first; a count going down starts the stage's next pass
    assert [s for s, d, t in seen if s != JOB_STAGE] == ["prior", "encode", "prior", "encode", "encode", "encode",
                                                          "windows", "decode"]
    assert units == [5, 9, 14, 20, 23, 30, 50]
    assert units == sorted(units) and units[-1] == job.total


def test_job_never_goes_back_and_caps_at_its_passes():
    seen = []
    job = JobProgress(lambda *a: seen.append(a), {"sampling": 8})
    for done in (2, 6, 4, 8, 8):
        job("sampling", done, 8)
    units = [d for s, d, t in seen if s == JOB_STAGE]
    assert units == sorted(units) and units[-1] == 8


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_printer_shows_job_share_and_eta_plain_and_on_a_terminal():
    plain = io.StringIO()
    printer = _ProgressPrinter(plain, quiet=False)
    job = JobProgress(printer, {"prior": 4, "decode": 4})
    for done in range(1, 5):
        job("prior", done, 4)
    text = plain.getvalue()
    assert "[diffueraser] prior: 4/4" in text
    assert "job 50% " in text and "ETA" in text and "job 100%" not in text

    tty = _Tty()
    printer = _ProgressPrinter(tty, quiet=False)
    job = JobProgress(printer, {"prior": 4, "decode": 4})
    for done in range(1, 5):
        job("prior", done, 4)
    job("decode", 1, 4)
    text = tty.getvalue()
    # one bar per stage, its own rate, and the whole job's share and ETA beside it
    assert "[diffueraser] prior" in text and ("step/s" in text or "s/step" in text)
    assert "job 62% " in text and "ETA" in text


def test_stages_taking_turns_chunk_by_chunk_keep_one_bar_each():
    """decode, blend and write alternate for every chunk once output is written as it completes: each keeps
    the bar it started with (a new bar per switch would leave three lines per chunk on a long run)."""
    printer = _ProgressPrinter(_Tty(), quiet=False)
    printer("decode", 2, 6)
    first = printer.open_bars["decode"]
    for done in (2, 4, 6):
        for stage in ("decode", "blend", "write"):
            printer(stage, done, 6)
            if done < 6:
                assert printer.open_bars[stage] is not None
        if done < 6:
            assert printer.open_bars["decode"] is first and len(printer.open_bars) == 3
    assert printer.open_bars == {}  # each closed when its stage completed
    printer("a", 1, 2)
    printer("b", 1, 2)
    printer("a", 2, 2)  # a's line is free again ...
    printer("c", 1, 2)  # ... and c takes it, not b's
    assert sorted(abs(bar.pos) for bar in printer.open_bars.values()) == [0, 1]
    printer.close()
    printer("encode", 3, 6)
    printer("encode", 1, 6)  # a new pass of the stage: a new bar
    assert printer.open_bars["encode"].n == 1
    printer.close()
    assert printer.open_bars == {}
