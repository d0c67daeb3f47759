"""The keras launcher on a real local Spark 4 (``local[2]``), with real rank processes.

The proof of averaging: one step of two ranks on batches b0 and b1 gives the weights of one
step of one process on b0 + b1. Then: ranks stay identical, metrics agree, a rank's
UserError reaches the driver, and a SIGKILLed rank fails the job in bounded time and leaves
no rank process behind.
"""

from __future__ import annotations

import time

import numpy as np
import psutil
import pytest

from pipelines.errors import UserError
from pipelines.train.keras_launcher import PEER_GRACE_S, RANK_MARKER, KerasSparkLauncher
from pipelines.train.launchers import RankLostError
from tests.keras import ranks

#: One XLA thread per rank: two ranks share the host's two cores.
RANK_ENV = {
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
#: The job must fail within rank_timeout_s + this after a rank is killed: the peer grace,
#: Spark's kill of the other task (spark.python.task.killTimeout) and generous slack.
MARGIN_S = PEER_GRACE_S + 30.0
RANK_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def launcher(spark) -> KerasSparkLauncher:
    return KerasSparkLauncher(spark, 2, slots_timeout_s=30, env=RANK_ENV)


def _rank_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(RANK_MARKER in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and not _zombie(pid)]
        if not alive and not _rank_processes():
            return True
        time.sleep(0.1)
    return False


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_steps_of_two_ranks_are_steps_of_one_process_on_both_batches(launcher):
    import keras

    seed, rate, steps = 11, 0.5, 3
    per_rank = [ranks.batches(100 + r, steps, 4) for r in range(2)]
    results = launcher.run(ranks.train, (per_rank, seed, rate), rank_timeout_s=60)

    assert [r["rank"] for r in results] == [0, 1] and {r["size"] for r in results} == {2}
    assert [r["local"] for r in results] == [(0, 2), (1, 2)]  # both on this host
    # One process, the same seed, each step on b0 + b1 concatenated.
    keras.utils.set_random_seed(seed)
    single = ranks.build_model(rate)
    losses = []
    for step in range(steps):
        x = np.concatenate([per_rank[0][step][0], per_rank[1][step][0]])
        y = np.concatenate([per_rank[0][step][1], per_rank[1][step][1]])
        losses.append(float(single.train_on_batch(x, y, return_dict=True)["loss"]))
    for ours, theirs in zip(results[0]["weights"], single.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    # Every rank ends with the very same weights, and saw the very same metrics.
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert results[0]["digest"] == results[1]["digest"]
    assert results[0]["history"] == results[1]["history"]
    np.testing.assert_allclose(results[0]["history"]["loss"], losses, rtol=1e-5)
    # Collectives of any picklable object; no optimizer wrapper.
    assert [r["broadcast"] for r in results] == [{"from": 0, "pad": ""}] * 2
    assert [r["allgather"] for r in results] == [[["r"], ["r", "r"]]] * 2
    assert all(r["wrapped"] for r in results)


@pytest.mark.slow
def test_one_step_of_two_ranks_is_one_step_on_both_batches(launcher):
    import keras

    seed, rate = 5, 0.5
    per_rank = [ranks.batches(200 + r, 1, 3) for r in range(2)]
    results = launcher.run(ranks.train, (per_rank, seed, rate), rank_timeout_s=60)
    keras.utils.set_random_seed(seed)
    single = ranks.build_model(rate)
    before = [w.copy() for w in single.get_weights()]
    x = np.concatenate([per_rank[0][0][0], per_rank[1][0][0]])
    y = np.concatenate([per_rank[0][0][1], per_rank[1][0][1]])
    single.train_on_batch(x, y)
    moved = 0.0
    after = single.get_weights()
    for ours, theirs, start in zip(results[1]["weights"], after, before, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
        moved = max(moved, float(np.abs(theirs - start).max()))
    assert moved > 1e-3  # the step did move the weights: the comparison can fail
    # Rank 0 alone (its own batch only) lands elsewhere: the ranks did exchange gradients.
    keras.utils.set_random_seed(seed)
    alone = ranks.build_model(rate)
    alone.train_on_batch(*per_rank[0][0])
    assert (
        max(
            float(np.abs(a - b).max())
            for a, b in zip(results[0]["weights"], alone.get_weights(), strict=True)
        )
        > 1e-4
    )


@pytest.mark.slow
def test_batch_norm_statistics_of_two_ranks_are_those_of_the_whole_batch(launcher):
    import keras

    seed, rate, steps = 7, 0.1, 2
    per_rank = [ranks.batches(300 + r, steps, 4) for r in range(2)]
    results = launcher.run(ranks.train, (per_rank, seed, rate, True), rank_timeout_s=60)
    keras.utils.set_random_seed(seed)
    single = ranks.build_model(rate, batch_norm=True)
    start = [w.copy() for w in single.get_weights()]
    for step in range(steps):
        x = np.concatenate([per_rank[0][step][0], per_rank[1][step][0]])
        y = np.concatenate([per_rank[0][step][1], per_rank[1][step][1]])
        single.train_on_batch(x, y)
    norm = single.layers[1]
    moving = [np.asarray(norm.moving_mean), np.asarray(norm.moving_variance)]
    assert all(float(np.abs(m - s).max()) > 1e-3 for m, s in zip(moving, start[4:6], strict=True))
    # get_weights holds the moving mean and variance too: the same on both ranks, and the
    # ones one process gets from the whole batch (not either rank's half of it).
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    for ours, theirs in zip(results[0]["weights"], single.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ranks_built_from_other_seeds_fail_before_training(launcher):
    # JAX 0.9 itself refuses a replicated variable whose value differs between processes,
    # as Keras creates it; the digest check at the start of fit is the second guard.
    per_rank = [ranks.batches(r, 1, 2) for r in range(2)]
    with pytest.raises(RankLostError, match="is not the same on each process"):
        launcher.run(ranks.train, (per_rank, [1, 2], 0.1), rank_timeout_s=60)
    assert _gone_within([], 15)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_a_killed_rank_fails_the_job_in_bounded_time_and_leaves_no_process(
    launcher, tmp_path, victim
):
    args = (str(tmp_path), 3, victim)
    with pytest.raises(RankLostError, match="killed by SIGKILL") as caught:
        launcher.run(ranks.die_while_training, args, rank_timeout_s=RANK_TIMEOUT_S)
    failed_at = time.time()
    assert (caught.value.rank, caught.value.exit_code) == (victim, -9), caught.value
    killed_at = float((tmp_path / "killed_at").read_text())
    print(f"\nkilled rank {victim} -> RankLostError on the driver: {failed_at - killed_at:.2f} s")
    assert failed_at - killed_at < RANK_TIMEOUT_S + MARGIN_S, failed_at - killed_at
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    assert _gone_within(pids, 15), [p.info for p in _rank_processes()]


@pytest.mark.slow
def test_a_rank_beside_a_killed_one_dies_with_its_task(launcher, tmp_path):
    # Rank 0 sleeps, outside any collective: only its task's end can take it down.
    started = time.monotonic()
    with pytest.raises(RankLostError) as caught:
        launcher.run(ranks.die_beside_a_sleeper, (str(tmp_path),), rank_timeout_s=RANK_TIMEOUT_S)
    assert (caught.value.rank, caught.value.exit_code) == (1, -9)
    assert time.monotonic() - started < 120  # not rank 0's 600 s of sleep
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(2)]
    assert _gone_within(pids, 15), [p.info for p in _rank_processes()]


def test_results_come_back_in_rank_order_with_each_ranks_place(launcher):
    results = launcher.run(ranks.where_am_i, (), rank_timeout_s=30)
    assert [r["KERAS_DISTRIBUTION_PROCESS_ID"] for r in results] == ["0", "1"]
    assert {r["KERAS_DISTRIBUTION_NUM_PROCESSES"] for r in results} == {"2"}
    assert [(r["DLPIPE_LOCAL_RANK"], r["DLPIPE_LOCAL_SIZE"]) for r in results] == [
        ("0", "2"),
        ("1", "2"),
    ]
    (coordinator,) = {r["KERAS_DISTRIBUTION_JOB_ADDRESSES"] for r in results}
    assert int(coordinator.rsplit(":", 1)[1]) > 0
    assert {r["DLPIPE_RANK_TIMEOUT_S"] for r in results} == {"30"}
    assert {r["KERAS_BACKEND"] for r in results} == {"jax"}
    assert {r["XLA_FLAGS"] for r in results} == {RANK_ENV["XLA_FLAGS"]}
    assert len({r["pid"] for r in results}) == 2  # a process of its own per rank


def test_a_user_error_in_a_rank_reaches_the_driver_as_that_error(launcher):
    with pytest.raises(UserError, match="^rank 1: the dataset has no label column$"):
        launcher.run(ranks.where_am_i, (1,))


def test_an_exception_in_a_rank_is_a_lost_rank_with_its_message(launcher):
    with pytest.raises(RankLostError, match="ValueError: rank 0: a bug") as caught:
        launcher.run(ranks.where_am_i, (0, "bug"))
    assert (caught.value.rank, caught.value.exit_code) == (0, 1)


def test_too_few_slots_and_elastic_mode_fail_in_one_line(spark):
    with pytest.raises(UserError, match=r"^train.num_proc=3 needs 3 concurrent Spark task slots"):
        KerasSparkLauncher(spark, 3, slots_timeout_s=1).wait_for_slots()
    with pytest.raises(UserError, match="no elastic mode") as caught:
        KerasSparkLauncher(spark, 2).run(ranks.where_am_i, (), elastic=True)
    assert "\n" not in str(caught.value)


def test_the_warmup_ramps_the_rate_per_step_as_horovods(tmp_path):
    # One process: the callback alone, with a loss whose gradient is 1, so each step moves
    # the single weight by exactly the rate it ran with.
    import keras

    from pipelines.train.jax_distribution import learning_rate_warmup

    inputs = keras.Input((1,))
    outputs = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.123), loss=lambda y, p: keras.ops.mean(p))
    steps, size, lr = 4, 2, 0.8
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.jax_state_sync()
            seen.append(float(self.model.get_weights()[0][0, 0]))

    x = np.ones((steps * 3, 1), np.float32)
    callbacks = [learning_rate_warmup(lr, 2, steps, size), Record()]
    model.fit(x, x, batch_size=1, epochs=3, steps_per_epoch=steps, callbacks=callbacks, verbose=0)
    rates = -np.diff([0.0, *seen])
    e = np.arange(1, 2 * steps + 1) / steps  # the epoch reached at the end of each step
    want = lr / size * (e * (size - 1) / 2 + 1)
    np.testing.assert_allclose(rates[: 2 * steps], want, rtol=1e-5)
    np.testing.assert_allclose(rates[2 * steps :], lr, rtol=1e-5)  # stays at the scaled rate
