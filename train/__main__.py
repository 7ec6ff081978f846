import sys

from train.engine.signals import catch_stop_signals

catch_stop_signals(sys.argv)  # first, before torch loads: a stop while a worker starts up must not kill it

from train.cli import entry  # noqa: E402

entry()
