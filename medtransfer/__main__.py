"""``python -m medtransfer …``: the same as the ``medtransfer`` command."""
from medtransfer.cli.main import main

if __name__ == "__main__":
    main()
