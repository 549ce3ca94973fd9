"""The one batched evaluator: chunks of batch_size rows, halving on out-of-memory, same results."""
import pytest
import torch
from torch import nn

import counterlens as cl
from counterlens.attribution import Evaluator, integrated_gradients
from counterlens.errors import InputError


class MemoryLimited(nn.Module):
    """Raises the CUDA out-of-memory error for batches above ``limit`` rows; records batch sizes."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.seen = limit, []
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.fc(x)


def test_chunks_never_exceed_batch_size():
    net = MemoryLimited(limit=10**6)
    clf = cl.Classifier(net, device="cpu")
    integrated_gradients(clf, torch.rand(3, 1, 4, 4), 1, steps=10, batch_size=7)
    assert net.seen[0] == 1 and max(net.seen[1:]) == 7 and sum(net.seen[1:]) == 30   # first: target check


def test_out_of_memory_halves_the_chunk_and_goes_on():
    torch.manual_seed(0)
    net = MemoryLimited(limit=5)
    clf = cl.Classifier(net, device="cpu")
    x = torch.rand(3, 1, 4, 4)
    a = integrated_gradients(clf, x, 1, steps=10, batch_size=64)
    # one row to check the target, then 30 rows -> 15 -> 7 -> 3 fit, and 3 is kept for the rest
    assert net.seen[:5] == [1, 30, 15, 7, 3] and set(net.seen[5:]) == {3} and sum(net.seen[4:]) == 30
    net.limit = 10**6
    b = integrated_gradients(clf, x, 1, steps=10, batch_size=64)
    torch.testing.assert_close(a, b)


def test_other_errors_are_not_swallowed():
    ev = Evaluator(cl.Classifier(nn.Identity(), device="cpu"), batch_size=4)

    def work(a, b):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        ev.run(10, work)
    with pytest.raises(InputError, match="batch_size"):
        Evaluator(cl.Classifier(nn.Identity(), device="cpu"), batch_size=0)


def test_run_covers_all_rows_in_order():
    ev = Evaluator(cl.Classifier(nn.Identity(), device="cpu"), batch_size=4)
    spans = ev.run(10, lambda a, b: (a, b))
    assert spans == [(0, 4), (4, 8), (8, 10)] and ev.calls == 3 and ev.rows == 10


@pytest.fixture
def steady_clock(monkeypatch):
    """A clock on which every chunk takes one second, whatever its size: larger chunks are cheaper
    per row, so the search doubles up to the cap (a real clock on a busy machine may not)."""
    import types

    import counterlens.attribution.base as base
    ticks = iter(range(10**9))
    monkeypatch.setattr(base, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))


def test_auto_batch_size_explores_then_settles_and_remembers(steady_clock):
    net = MemoryLimited(limit=10**6)
    clf = cl.Classifier(net, device="cpu")
    x = torch.rand(4, 1, 4, 4)
    a = integrated_gradients(clf, x, 1, steps=50, batch_size="auto")
    rows = net.seen[1:]
    assert sum(rows) == 200                              # every row exactly once
    assert rows[:3] == [1, 2, 4]                         # doubling exploration first
    assert max(rows) <= 64                               # the CPU cap
    (size,) = [state["best"] for key, state in clf._chunk_sizes.items() if key[0].endswith("gradients.py")]
    assert size in rows
    net.seen.clear()
    b = integrated_gradients(clf, x, 1, steps=50, batch_size="auto")
    assert net.seen[0] == size                           # remembered: no second exploration (and no target check)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="auto"):
        integrated_gradients(clf, x, 1, batch_size="big")


def test_auto_exploration_goes_on_across_small_calls(steady_clock):
    net = MemoryLimited(limit=10**6)
    clf = cl.Classifier(net, device="cpu")
    x = torch.rand(1, 1, 4, 4)
    integrated_gradients(clf, x, 1, steps=6, batch_size="auto")      # rows 6: chunks 1, 2, then 3 left
    assert net.seen[1:] == [1, 2, 3]
    net.seen.clear()
    integrated_gradients(clf, x, 1, steps=6, batch_size="auto")      # goes on at 4 (unless 2 was slower)
    (state,) = [state for key, state in clf._chunk_sizes.items() if key[0].endswith("gradients.py")]
    assert net.seen[0] in (4, min(state["timings"], key=state["timings"].get)) and sum(net.seen) == 6
