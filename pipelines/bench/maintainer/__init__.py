"""Benchmarks only maintainers run: not part of the wheel.

:mod:`~pipelines.bench.maintainer.peer` builds an environment of its own with pip (the
peer's stack, Horovod's ``KerasEstimator`` with pyarrow < 11) and times a whole ``dlpipe
train`` process against the peer's training in it; :mod:`~pipelines.bench.maintainer
.peer_runner` is what runs in that environment. Both need a checkout of the project (``make
venv``); ``dlpipe bench peer`` from an installed wheel says so in one line.
"""
