"""The progress facility: a tqdm bar with rate and ETA on a terminal, else one line of figures."""

import io
import logging
import re

from actclust.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_a_bar_with_counts_rate_and_steps(caplog):
    stream = _Terminal()
    progress = Progress(4096, "extract", stream=stream, step_unit="shards")
    with caplog.at_level(logging.INFO, logger="actclust"):
        for _ in range(4):
            progress.update(1024, total_steps=4)
        seconds = progress.close()
    out = stream.getvalue()
    final = out.split("\r")[-1]
    assert final.startswith("extract: 100%"), out
    assert "4.10k/4.10k" in final and "4/4 shards" in final
    assert re.search(r"[\d.]+[kMG]? tokens/s", final), final
    assert seconds >= 0 and not caplog.records  # the bar is the figure; no extra line


def test_elsewhere_silent_until_the_end_then_one_line_of_figures(caplog):
    stream = io.StringIO()
    progress = Progress(2, "cluster", unit="layers", stream=stream)
    with caplog.at_level(logging.INFO, logger="actclust"):
        progress.update(1)
        assert not caplog.records
        progress.update(1)
        progress.close()
    assert stream.getvalue() == ""
    (record,) = caplog.records
    assert re.fullmatch(r"cluster: 2 layers in [\d.]+ s \(([\d.,]+ layers/s|[\d.]+ s per layer)\)",
                        record.getMessage()), record.getMessage()


def test_a_stage_with_nothing_to_do_says_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="actclust"):
        Progress(0, "extract", stream=io.StringIO()).close()
    assert not caplog.records
