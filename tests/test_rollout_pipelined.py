"""rollout.pipelined: scoring chunk i while chunk i+1 samples gives the sequential loop's records,
in chunk order, propagates errors and leaves no helper thread behind."""

import threading
import time

import pytest

from g2rpo_jax import rollout

SCORER_PREFIX = "pipelined-score"


def sequential(chunks, sample_fn, score_fn):
    """The reference: sample, score and record one chunk after another in this thread."""
    records = []
    for chunk in chunks:
        sampled = sample_fn(chunk)
        records.append((chunk, sampled, score_fn(chunk, sampled)))
    return records


def scorer_threads():
    return [t for t in threading.enumerate() if t.name.startswith(SCORER_PREFIX)]


class Trace:
    """Sample/score functions whose durations vary per chunk (so a later score could overtake an
    earlier one if order were not enforced), logging which thread ran what."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events = []

    def log(self, *event):
        with self.lock:
            self.events.append((*event, threading.current_thread().name))

    def sample(self, chunk):
        self.log("sample", chunk)
        time.sleep(0.002 * (chunk % 3))
        return [chunk * 10 + i for i in range(3)]

    def score(self, chunk, sampled):
        self.log("score start", chunk)
        time.sleep(0.003 * ((chunk + 1) % 4))
        self.log("score end", chunk)
        return sum(sampled) + 0.5


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("num_chunks", [0, 1, 2, 7])
def test_records_match_the_sequential_loop_in_chunk_order(overlap, num_chunks):
    trace = Trace()
    chunks = list(range(num_chunks))
    recorded = []
    rollout.pipelined(iter(chunks), trace.sample, trace.score,
                      lambda c, s, r: recorded.append((c, s, r)), overlap=overlap)
    assert recorded == sequential(chunks, Trace().sample, Trace().score)
    assert not scorer_threads()
    main = threading.current_thread().name
    sampling_threads = {name for kind, _, name in trace.events if kind == "sample"}
    scoring_threads = {name for kind, _, name in trace.events if kind.startswith("score")}
    assert sampling_threads <= {main}  # sampling (device work) stays in the calling thread
    if overlap:
        assert all(name.startswith(SCORER_PREFIX) for name in scoring_threads)
    else:
        assert scoring_threads <= {main}


def test_scoring_overlaps_the_next_chunks_sampling():
    """Chunk 1 samples while chunk 0 is scored: the score must start before the next sample ends."""
    score_started = threading.Event()
    sample_saw_score = []

    def sample(chunk):
        if chunk == 1:
            sample_saw_score.append(score_started.wait(timeout=5))
        return chunk

    def score(chunk, sampled):
        if chunk == 0:
            score_started.set()
        return sampled

    recorded = []
    rollout.pipelined(range(2), sample, score, lambda c, s, r: recorded.append(r), overlap=True)
    assert sample_saw_score == [True] and recorded == [0, 1]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("failing", ["sample", "score", "record"])
def test_errors_propagate_and_the_scorer_thread_is_shut_down(overlap, failing):
    recorded = []

    def sample(chunk):
        if failing == "sample" and chunk == 2:
            raise RuntimeError("sample failed at 2")
        return chunk

    def score(chunk, sampled):
        if failing == "score" and chunk == 2:
            raise RuntimeError("score failed at 2")
        return -chunk

    def record(chunk, sampled, scored):
        if failing == "record" and chunk == 2:
            raise RuntimeError("record failed at 2")
        recorded.append(chunk)

    with pytest.raises(RuntimeError, match=f"{failing} failed at 2"):
        rollout.pipelined(range(5), sample, score, record, overlap=overlap)
    # Chunks are recorded in order and none from the failing one on; with overlap, chunk 1 would
    # have been recorded after chunk 2 sampled, so a sampling failure leaves it unrecorded.
    assert recorded == ([0] if overlap and failing == "sample" else [0, 1])
    assert not scorer_threads()
