"""The data bar never goes backwards (#23, point 9): a failed attempt's bytes are thrown
away, and the bar holds where it is until the retry has received as much again, instead of
jumping back, which reads as data lost. Checked on a terminal (a pty), as a user sees it,
and on the Progress object for the exact sequence of a retry."""

from __future__ import annotations

import re
import sys

from helpers import SCRIPT, terminal_screen
from tcia_dl import errors
from tcia_dl.logs import Progress
from tcia_dl.sources.base import AttemptBytes

# tqdm's line, e.g. "data:  37%|###7      | 1.23M/3.33M [00:01<00:02, 1.1MB/s]"
DATA_BAR = re.compile(r"data:\s+(\d+)%\|[^|]*\|\s*([\d.]+)([kMG]?)/")
SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}


def test_retries_never_move_the_data_bar_backwards_on_a_terminal(tmp_path, fake_nbia_factory):
    # Zips cut short or with a damaged image are received, then thrown away whole.
    fake = fake_nbia_factory(demo_series=6, instances=6, image_size=128, conn_bandwidth=400_000,
                             faults={"truncate": 0.3, "corrupt": 0.3, "reset": 0.2})
    code, screen = terminal_screen(
        [sys.executable, str(SCRIPT), "--collection", "DEMO", "--output", str(tmp_path / "o"),
         "--cache_dir", str(tmp_path / "c"), "--api-url", fake.url, "--compression",
         "--workers", "2", "--retry-wait", "0.05", "--retries", "20"])
    assert code == errors.EXIT_OK, screen[-3000:]
    assert fake.counters.requests("getImage", 200) > 6     # attempts were thrown away
    shown = [(int(percent), float(number) * SCALE[unit])
             for percent, number, unit in DATA_BAR.findall(screen)]
    assert len(shown) >= 5, screen[-3000:]
    for before, after in zip(shown, shown[1:]):
        assert after >= before, f"the data bar went from {before} to {after}"
    assert shown[-1][0] == 100


def test_a_retry_holds_the_bar_until_it_has_received_as_much_again():
    progress = Progress(total_series=2, total_bytes=1000, bars=False, interval=3600)
    try:
        first = AttemptBytes(progress.add_bytes)
        first(300)
        assert progress.shown == 300
        first.take_back()                          # the attempt failed: thrown away
        assert progress.shown == 300 and progress.received == 0
        first(200)
        assert progress.shown == 300               # held: the retry has not caught up
        first(250)
        assert progress.shown == 450
        progress.series_finished(True, first.received, 600)   # set to its FileSize
        assert progress.shown == 600
        second = AttemptBytes(progress.add_bytes)
        second(500)                                # a zip larger than its FileSize
        assert progress.shown == 1000              # never past the total
        progress.series_finished(True, second.received, 400)
        assert progress.shown == 1000
        assert "1.0 kB of 1.0 kB" in progress.summary()
    finally:
        progress.close()
