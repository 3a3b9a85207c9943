"""Cameras and matchers on a memshare queue.

Five camera processes produce 5000x250 float64 descriptor frames (10 MB
each) into a bounded queue; when the queue is full for 50 ms a camera skips
the frame. Two matcher processes take frames, keep the latest frame of every
camera and match each new frame against the other cameras' latest frames by
cosine similarity.

Note what is missing: no close(), unlink(), SharedMemory names or
resource-tracker workarounds. A frame is born in shared memory
(``ms.empty``), travels as a handle of under 256 bytes, and is freed when the matcher
drops it (here: when a newer frame of that camera replaces it).

The same code runs from a notebook (paste it into a cell and call
``run(ctx=ms.get_context("spawn"))``): memshare's processes send the cameras
and matchers defined there by value.

Run: python examples/producer_consumer.py [--frames N] [--no-sleep]
"""

from __future__ import annotations

import argparse
import queue
import time

import numpy as np

import memshare as ms

N_CAMERAS = 5
N_MATCHERS = 2
FRAME_SHAPE = (5000, 250)
KEYPOINTS = 128  # descriptors of a new frame matched against a whole other frame


def camera(cam: int, frames: queue.Queue, n_frames: int, fps: float | None, new_frame=ms.empty):
    """Produces ``n_frames`` frames; returns (sent, skipped) on the results queue."""
    rng = np.random.default_rng(cam)
    sent = skipped = 0
    for i in range(n_frames):
        frame = new_frame(FRAME_SHAPE)  # born in shared memory
        rng.standard_normal(out=frame)
        try:
            frames.put((cam, i, frame), timeout=0.05)
            sent += 1
        except queue.Full:
            skipped += 1  # the matchers are behind: drop this frame
        if fps:
            time.sleep(1 / fps)  # the camera's frame rate
    return sent, skipped


def _normalise(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def matcher(frames: queue.Queue, results: queue.Queue) -> None:
    """Matches each new frame against the latest frame of every other camera."""
    latest: dict[int, np.ndarray] = {}
    matched = 0
    best = []
    while True:
        item = frames.get(timeout=120)
        if item is None:
            break
        cam, _, frame = item
        keys = _normalise(frame[:KEYPOINTS])
        for other, theirs in latest.items():
            if other != cam:
                sim = keys @ _normalise(theirs).T  # cosine similarities
                best.append(float(sim.max(axis=1).mean()))
        latest[cam] = frame  # the previous frame of this camera is freed here
        matched += 1
    locks = ms.stats()["lock_acquisitions"]  # this process's arena-lock traffic
    results.put(("matcher", matched, float(np.mean(best)) if best else 0.0, locks))


def _camera_proc(cam, frames, results, n_frames, fps, plain):
    new_frame = np.empty if plain else ms.empty
    sent, skipped = camera(cam, frames, n_frames, fps, new_frame)
    results.put(("camera", sent, skipped, ms.stats()["lock_acquisitions"]))


def run(
    n_frames: int = 40,
    fps: float | None = 30.0,
    maxsize: int = 8,
    queue_factory=None,
    plain_frames: bool = False,
    ctx=None,
) -> dict:
    """Runs the scenario; returns frames sent/skipped/matched, frames/s and the
    arena-lock acquisitions of the cameras and matchers.

    ``ctx`` is a multiprocessing context (default: memshare's of the default
    start method); ``queue_factory(maxsize)`` makes the queues (default
    ``ms.Queue``).
    """
    ctx = ctx or ms.get_context()
    make = queue_factory or ms.Queue
    frames, results = make(maxsize), make()
    matchers = [ctx.Process(target=matcher, args=(frames, results)) for _ in range(N_MATCHERS)]
    cams = [
        ctx.Process(target=_camera_proc, args=(c, frames, results, n_frames, fps, plain_frames))
        for c in range(N_CAMERAS)
    ]
    for p in matchers + cams:
        p.start()
    t0 = time.perf_counter()
    out = {"sent": 0, "skipped": 0, "matched": 0, "similarity": [], "lock_acquisitions": 0}
    for _ in range(N_CAMERAS):
        _, sent, skipped, locks = results.get(timeout=120)
        out["sent"] += sent
        out["skipped"] += skipped
        out["lock_acquisitions"] += locks
    for p in cams:  # a camera exits once its frames are in the queue
        p.join(120)
    for _ in range(N_MATCHERS):
        frames.put(None, timeout=120)
    for _ in range(N_MATCHERS):
        _, matched, sim, locks = results.get(timeout=120)
        out["matched"] += matched
        out["similarity"].append(sim)
        out["lock_acquisitions"] += locks
    elapsed = time.perf_counter() - t0
    for p in matchers:
        p.join(60)
    out["seconds"] = elapsed
    out["frames_per_s"] = out["matched"] / elapsed
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=40, help="frames per camera")
    ap.add_argument("--no-sleep", action="store_true", help="cameras run flat out")
    args = ap.parse_args()
    r = run(args.frames, None if args.no_sleep else 30.0)
    print(
        f"{r['sent']} frames sent, {r['skipped']} skipped (queue full), {r['matched']} matched "
        f"in {r['seconds']:.2f} s: {r['frames_per_s']:.1f} frames/s; "
        f"mean best cosine similarity {np.mean(r['similarity']):.3f}"
    )
    print("shared memory in use now:", ms.stats()["bytes_in_use"], "bytes")


if __name__ == "__main__":
    main()
