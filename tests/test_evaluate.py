"""The evaluation windows: held-out ranges for tuning start where the reported windows end."""

import pytest
import torch

from llmq.evaluate import windows


def test_windows_from_a_later_window():
    ids = torch.arange(100)
    assert [w.tolist()[:2] for w in windows(ids, 10, None, 3, first_window=2)] == [[20, 21], [30, 31], [40, 41]]
    later = windows(ids, 10, 7, None, first_window=9)  # BOS takes a position: 11 windows of 9 tokens
    assert len(later) == 2 and later[0].tolist() == [7, *range(81, 90)]
    first = windows(ids, 10, None, 4)
    assert torch.equal(torch.cat([*first, *windows(ids, 10, None, 4, first_window=4)]), torch.arange(80))


def test_windows_outside_the_text_are_refused():
    with pytest.raises(ValueError, match="first window 10 is outside the text's 10 windows"):
        windows(torch.arange(100), 10, None, 5, first_window=10)
