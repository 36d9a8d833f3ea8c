"""``python -m largebatch`` is the ``largebatch`` command."""
# First: a stop signal during start-up (imports take seconds) is remembered, not fatal.
from largebatch.signals import catch_early

catch_early()

from largebatch.cli import main  # noqa: E402 (after the handlers, on purpose)

if __name__ == "__main__":
    main()
