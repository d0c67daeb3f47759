"""Which stack a process is on, the launcher a config means there, and the refusal of a model
trained on the other stack (both directions: one venv holds one stack)."""

from __future__ import annotations

import pytest

from pipelines import stack
from pipelines.config import ConfigError, TrainConfig
from pipelines.errors import UserError


def test_this_venv_is_the_keras_stack():
    assert stack.current() == stack.KERAS


@pytest.mark.parametrize(
    ("configured", "on", "runs"),
    [
        ("horovod", stack.KERAS, "keras"),
        ("keras", stack.KERAS, "keras"),
        ("local", stack.KERAS, "local"),
        ("horovod", stack.DEFAULT, "horovod"),
        ("local", stack.DEFAULT, "local"),
    ],
)
def test_the_launcher_a_config_means_on_each_stack(configured, on, runs):
    assert stack.launcher_for(configured, on) == runs


def test_the_keras_launcher_on_the_default_stack_is_one_line():
    with pytest.raises(UserError, match="train.launcher=keras needs the Keras stack") as caught:
        stack.launcher_for("keras", stack.DEFAULT)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("recorded", "here", "refused"),
    [
        ("keras", stack.KERAS, False),
        ("default", stack.DEFAULT, False),
        (None, stack.DEFAULT, False),  # logged before stacks were recorded: the default stack
        ("default", stack.KERAS, True),
        (None, stack.KERAS, True),
        ("keras", stack.DEFAULT, True),
    ],
)
def test_a_model_runs_only_on_the_stack_that_trained_it(recorded, here, refused):
    if not refused:
        stack.check_model_stack(recorded, "models:/m/1", here)
        return
    with pytest.raises(stack.WrongStackError) as caught:
        stack.check_model_stack(recorded, "models:/m/1", here)
    message = str(caught.value)
    assert "\n" not in message and "models:/m/1" in message
    assert f"trained on the {recorded or 'default'} stack" in message
    assert f"cannot run on the {here} stack" in message


def test_elastic_with_the_keras_launcher_is_a_config_error():
    with pytest.raises(ConfigError, match="train.elastic=true needs train.launcher=horovod"):
        TrainConfig(launcher="keras", elastic=True)


def test_the_preflight_has_a_table_per_stack_and_refuses_a_mixed_one():
    from pipelines import preflight

    env = preflight.lookup()
    assert not preflight.problems(preflight.check(env))
    names = [req.name for req in preflight.requirements()]
    assert names == [req.name for req in preflight.KERAS_REQUIREMENTS]
    # The same interpreter checked against the pinned table fails, and the Keras table
    # refuses Horovod found beside Keras 3 (a mixed environment), one line each.
    assert preflight.problems(preflight.check(env, stack=stack.DEFAULT))
    mixed = preflight.Environment(
        {**env.packages, "horovod": preflight.Found("0.28.1", ("horovod",))}, None
    )
    lines = preflight.problems(preflight.check(mixed))
    assert len(lines) == 1 and lines[0].startswith("horovod: found 0.28.1, need not installed")
