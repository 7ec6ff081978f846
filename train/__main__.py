import sys

from train.engine.signals import STOPPABLE_COMMANDS, catch_stop_signals

if sys.argv[1:2] and sys.argv[1] in STOPPABLE_COMMANDS:
    catch_stop_signals()  # first, before torch loads: a stop while a worker starts up must not kill it

from train.cli import main  # noqa: E402

raise SystemExit(main())
