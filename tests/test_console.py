"""The console and the log file: what a person sees, where library logs go, events for TensorBoard."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap

import pytest

from vlm_jax import console
from vlm_jax.train.metrics import write_experiment_events


def test_duration_reads_as_a_person_says_it():
    assert [console.duration(s) for s in (0.04, 42.06, 60, 185.4, 3600, 3725)] == [
        "0.0 s", "42.1 s", "1 min 00 s", "3 min 05 s", "1 h 00 min", "1 h 02 min"]


def test_metrics_table_lists_metrics_but_not_timings_or_data_counts():
    table = console.metrics_table({"eval/top1": 0.25, "time/run_s": 3.0, "data/skipped": 0.0, "loss": math.nan,
                                   "note": "text"})
    assert table.splitlines() == ["eval/top1  0.25", "loss       -"]
    assert console.metrics_table({"time/x_s": 1.0}) == ""


def test_the_sink_buffers_until_its_file_opens_then_appends(tmp_path):
    sink = console._LogSink()
    sink.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test_console_sink")
    logger.propagate, logger.level = False, logging.DEBUG
    logger.addHandler(sink)
    try:
        logger.info("before")
        logger.debug("dropped: below INFO")
        assert not (tmp_path / "log.txt").exists()
        sink.open(tmp_path / "log.txt")
        logger.warning("after")
        assert (tmp_path / "log.txt").read_text() == "INFO before\nWARNING after\n"
        sink.close_file()
        sink.open(tmp_path / "log.txt")  # a resumed run appends
        logger.info("again")
        assert (tmp_path / "log.txt").read_text().splitlines()[-1] == "INFO again"
    finally:
        logger.removeHandler(sink)
        sink.close()


# The routing, in a fresh interpreter (it changes the process's logging): absl and plain-Python INFO
# lines reach log.txt only, warnings both, `say` lines stdout and log.txt; --verbosity brings INFO back.
SCRIPT = textwrap.dedent("""
    import logging, sys
    from absl import app, flags, logging as absl_logging
    from vlm_jax import console

    def main(argv):
        console.configure(verbose=flags.FLAGS["verbosity"].present)
        absl_logging.info("absl info before the workdir")
        console.log_to(WORKDIR)
        logging.getLogger("orbax.fake").info("library info")
        absl_logging.warning("a warning that matters")
        console.say("memory: 6.1 s")
        console.close()

    WORKDIR = sys.argv.pop(1)
    app.run(main)
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_library_info_goes_to_the_log_file_and_warnings_and_stages_to_the_console(tmp_path, verbose):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    command = [sys.executable, str(script), str(tmp_path / "work"), *(["--verbosity=0"] if verbose else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "work" / "log.txt").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in log] == [
        "absl info before the workdir", "library info", "a warning that matters", "memory: 6.1 s"]
    assert log[0].startswith("I") and log[2].startswith("W")  # absl's prefix: level, time, file
    assert result.stdout == "memory: 6.1 s\n"
    infos = ["absl info before the workdir", "library info"]
    assert all((info in result.stderr) == verbose for info in infos), result.stderr
    assert "a warning that matters" in result.stderr


def test_experiment_events_hold_each_rows_seeds_and_the_stage_times(tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer  # noqa: PLC0415

    rows = {"baseline": [{"top1": 0.25, "skipped": math.nan}],
            "reco": [{"top1": 0.5, "recall@1": 0.1}, {"top1": 0.75, "recall@1": 0.2}]}
    write_experiment_events(tmp_path, rows, {"time/memory_s": 6.5})
    events = EventMultiplexer().AddRunsFromDirectory(str(tmp_path)).Reload()
    assert sorted(events.Runs()) == ["tb/baseline", "tb/reco", "tb/stages"]
    assert [(e.step, e.value) for e in events.Scalars("tb/reco", "results/top1")] == [(0, 0.5), (1, 0.75)]
    assert [e.value for e in events.Scalars("tb/reco", "results/recall_1")] == pytest.approx([0.1, 0.2])
    assert events.Runs()["tb/baseline"]["scalars"] == ["results/top1"]  # non-finite values are left out
    assert [e.value for e in events.Scalars("tb/stages", "time/memory_s")] == [6.5]
