"""The replaying sampler inside a real Ultralytics InfiniteDataLoader (2 workers
prefetching across passes): every epoch's order is known, a position names the
pass and batch, and a new process resumes with exactly the rest of the pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from gpuguard.integrations.replay import SEQUENTIAL, Position, ReplaySampler, install, permutation

SAMPLES, BATCH = 20, 4  # 5 batches a pass


class Indices:
    """A dataset whose items are their own indices."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> int:
        return i


@dataclass
class Trainer:
    """The trainer attributes install() reads, and the loop's consumption of one epoch."""

    train_loader: Any
    start_epoch: int = 0
    args: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(seed=3))
    replay: ReplaySampler | None = None

    def epoch(self, stop_after: int | None = None) -> list[int]:
        """Iterate one epoch as _do_train does; stop_after = the batch whose end is a checkpoint."""
        seen: list[int] = []
        for n, batch in enumerate(self.train_loader, 1):
            self.replay.consumed()  # the guard's on_train_batch_start
            seen += batch.tolist()
            if n == stop_after:
                break
        return seen


def trainer(workers: int = 2, start_epoch: int = 0, shuffle: bool = True) -> Trainer:
    from ultralytics.data.build import build_dataloader

    loader = build_dataloader(Indices(), batch=BATCH, workers=workers, shuffle=shuffle, rank=-1, device="cpu")
    t = Trainer(loader, start_epoch=start_epoch)
    t.replay = install(t)
    assert t.replay is not None
    return t


@pytest.mark.parametrize("workers", [0, 2])
def test_each_epoch_is_a_whole_permutation_named_by_its_label(workers: int) -> None:
    t = trainer(workers)
    first, second = t.epoch(), t.epoch()
    assert first == permutation(SAMPLES, 3, 0) and second == permutation(SAMPLES, 3, 1)
    assert sorted(first) == list(range(SAMPLES)) and first != second
    assert len(t.train_loader) == 5
    t.train_loader.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_process_trains_exactly_the_rest_of_the_interrupted_pass(workers: int) -> None:
    old = trainer(workers)
    old.epoch()
    trained = old.epoch(stop_after=2)
    pos = old.replay.position()
    assert (pos.label, pos.done, pos.batches) == (1, 2, 5)
    old.train_loader.close()

    new = trainer(workers, start_epoch=1)
    new.replay.resume_at(Position.from_json(pos.to_json()))
    assert len(new.train_loader) == 3  # the resumed epoch is sized to what is left
    rest = new.epoch()
    assert trained + rest == permutation(SAMPLES, 3, 1)  # nothing twice, nothing skipped, same order
    assert len(new.train_loader) == 5 and sorted(new.epoch()) == list(range(SAMPLES))  # then whole epochs
    new.train_loader.close()


def test_an_unshuffled_loader_replays_in_index_order() -> None:
    """rect=True training: no shuffle, and a resume still skips exactly the batches trained."""
    old = trainer(2, shuffle=False)
    assert old.epoch(stop_after=3) == list(range(3 * BATCH))
    pos = Position.from_json(old.replay.position().to_json())
    assert pos.order == SEQUENTIAL and pos.done == 3
    old.train_loader.close()
    new = trainer(2, shuffle=False)
    new.replay.resume_at(pos)
    assert new.epoch() == list(range(3 * BATCH, SAMPLES))
    new.train_loader.close()


def test_position_after_a_resumed_pass_counts_from_the_pass_start() -> None:
    t = trainer(0, start_epoch=4)
    t.replay.resume_at(Position(label=7, done=1, batches=5, samples=SAMPLES, batch_size=BATCH, seed=3))
    t.epoch(stop_after=2)  # batches 2 and 3 of pass 7
    assert (t.replay.position().label, t.replay.position().done) == (7, 3)


def test_reset_between_epochs_drops_prefetched_passes_and_keeps_count() -> None:
    t = trainer(2)
    t.epoch()  # the workers have prefetched into the next pass(es)
    t.train_loader.reset()  # what closing mosaic does
    resumed = t.epoch(stop_after=1)
    pos = t.replay.position()
    assert resumed == permutation(SAMPLES, 3, pos.label)[:BATCH] and pos.done == 1
    t.train_loader.close()


def test_reset_before_the_resumed_epoch_keeps_the_resume_position() -> None:
    t = trainer(2, start_epoch=1)
    t.replay.resume_at(Position(label=1, done=3, batches=5, samples=SAMPLES, batch_size=BATCH, seed=3))
    iter(t.train_loader).__next__()  # a pass handed out and prefetched, nothing trained yet...
    t.train_loader.reset()  # ...then dropped
    assert t.epoch() == permutation(SAMPLES, 3, 1)[3 * BATCH :]
    t.train_loader.close()


def test_position_at_step_is_where_the_weights_stand() -> None:
    """Batches after the last optimizer step are in no weights yet: a checkpoint stands before them."""
    t = trainer(0)
    assert t.replay.position_at_step() is None
    t.epoch(stop_after=1)
    t.replay.stepped()
    t.epoch(stop_after=2)  # continues the same pass: batches 2 and 3, no step
    assert (t.replay.position().done, t.replay.position_at_step().done) == (3, 1)
    t.replay.stepped()
    assert t.replay.position_at_step().done == 3
    t.train_loader.reset()
    assert t.replay.position_at_step() is None  # counting starts again with the new iterator


def test_last_batch_of_a_pass_resumes_with_that_batch_again() -> None:
    t = trainer(0)
    t.epoch()
    assert t.replay.position().done == 4  # never "5 of 5": the resumed epoch would be empty


@pytest.mark.parametrize(
    "data",
    [None, "x", {}, {"order": "torch-randperm"}, {**Position(1, 0, 5, 20, 4, 3).to_json()},
     {**Position(1, 5, 5, 20, 4, 3).to_json()}, {**Position(1, 2, 5, 20, 4, 3).to_json(), "done": "two"}],
)  # fmt: skip
def test_position_from_json_refuses_what_it_cannot_replay(data: object) -> None:
    assert Position.from_json(data) is None


def test_install_declines_a_loader_it_does_not_know() -> None:
    t = Trainer(train_loader=SimpleNamespace(batch_sampler=None))
    assert install(t) is None
