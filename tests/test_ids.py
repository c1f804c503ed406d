"""Request ids and session incarnations are unique: within a process, and across processes (and so across
replicas and restarts), as the compare-and-set of a restarted session relies on."""

import subprocess
import sys

from lstm_serve.ids import unique_id


def test_ids_never_repeat_in_a_process_or_across_processes():
    ours = {unique_id() for _ in range(100_000)}
    code = "from lstm_serve.ids import unique_id; print(*(unique_id() for _ in range(1000)))"
    others = [set(subprocess.check_output([sys.executable, "-c", code], text=True).split()) for _ in range(3)]
    assert len(ours) == 100_000 and all(len(ids) == 1000 for ids in others)
    everything = [ours, *others]
    assert sum(map(len, everything)) == len(set().union(*everything))
