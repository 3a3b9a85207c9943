"""Soak (``pytest -m slow``, ``make test-slow``): ten minutes of Pool and Queue
traffic with random SIGKILLs; RSS and arena usage must stay flat."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import time
import zlib

import numpy as np
import pytest

import memshare as ms

T = 60
DURATION = float(os.environ.get("MEMSHARE_SOAK_SECONDS", 600))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def soak_task(src, i):
    out = np.outer(src[i % len(src)], src[(i + 1) % len(src)][:100])
    return zlib.crc32(out.view(np.uint8)), out


def queue_producer(q, seed):
    rng = np.random.default_rng(seed)
    while True:
        a = rng.random(int(rng.integers(1, 200_000)))
        q.put((zlib.crc32(a.view(np.uint8)), a), timeout=T)


@pytest.mark.slow
@pytest.mark.timeout(DURATION + 300)
def test_soak_pool_and_queue_with_random_kills():
    rng = random.Random(7)
    ctx = mp.get_context("fork")
    src = ms.share(np.random.default_rng(0).random((64, 5000)))
    q = ms.Queue(16)
    samples = []
    kills = rounds = 0
    deadline = time.monotonic() + DURATION
    producer = ctx.Process(target=queue_producer, args=(q, 0))
    producer.start()
    while time.monotonic() < deadline:
        rounds += 1
        with ms.Pool(2, context=ctx) as pool:
            it = pool.imap_unordered(_star, [(src, i) for i in range(rng.randint(5, 40))])
            kill_at = rng.randint(0, 20)
            try:
                for n, (crc, out) in enumerate(it):
                    assert crc == zlib.crc32(out.view(np.uint8))
                    if n == kill_at:
                        rng.choice(pool._pool).kill()  # no pid race with a reaped worker
                        kills += 1
            except ms.WorkerLostError:
                pass
            pool.terminate()
        for _ in range(rng.randint(1, 50)):
            crc, a = q.get(timeout=T)
            assert crc == zlib.crc32(a.view(np.uint8))
            del a
        if rng.random() < 0.2:  # replace the producer, killing it mid-put
            producer.kill()
            producer.join(T)
            kills += 1
            producer = ctx.Process(target=queue_producer, args=(q, rounds))
            producer.start()
        ms.reap()
        gc.collect()
        samples.append((rss_kib(), ms.stats()["bytes_reserved"]))
    producer.kill()
    producer.join(T)
    while True:
        try:
            q.get_nowait()
        except Exception:
            break
    del q
    ms.reap()
    gc.collect()
    print(f"soak: {rounds} rounds, {kills} kills, samples {samples[:: max(1, len(samples) // 10)]}")
    # After a warm-up quarter, neither RSS nor reserved shared memory grows.
    warm = samples[len(samples) // 4 :]
    assert max(s[0] for s in warm) - warm[0][0] < 50_000, "RSS grew by more than 50 MiB"
    assert max(s[1] for s in warm) <= warm[0][1] * 1.25 + (64 << 20), "arena kept growing"


def _star(args):
    return soak_task(*args)
