"""``python -m largebatch`` is the ``largebatch`` command."""
from largebatch.cli import main

if __name__ == "__main__":
    main()
