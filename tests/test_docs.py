"""What the README and docs/ claim, checked: handle sizes."""

from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest

import memshare as ms

#: The docs say "under 256 bytes" wherever they give a handle's size.
HANDLE_BOUND = 256


@pytest.mark.parametrize(
    "make",
    [
        lambda: ms.share(np.arange(1_000_000, dtype="f8")),
        lambda: ms.share(np.zeros((1000, 1000))),
        lambda: ms.share(np.zeros((1000, 1000)))[::3, 7:],
        lambda: ms.share(np.asfortranarray(np.ones((300, 400, 5), "c16"))),
        lambda: ms.share(np.zeros(100_000, dtype=[("t", "M8[ns]"), ("x", "f4", (3,))])),
        lambda: ms.share(np.zeros(100_000, "U16")),
    ],
    ids=["1d", "2d", "strided", "f-order-3d", "structured", "unicode"],
)
def test_a_shared_array_travels_as_a_handle_under_256_bytes(make):
    a = make()
    message = bytes(ForkingPickler.dumps(a))  # pins the block until loaded
    assert len(message) < HANDLE_BOUND, len(message)
    b = ForkingPickler.loads(message)
    assert np.shares_memory(a, b) and b.shape == a.shape and b.strides == a.strides
    del a, b


def test_a_queue_pickles_to_a_handle_under_256_bytes():
    q = ms.Queue(maxsize=50)
    message = bytes(ForkingPickler.dumps(q))
    assert len(message) < HANDLE_BOUND, len(message)
    q.put(1)
    assert ForkingPickler.loads(message).get(timeout=60) == 1
