"""``python -m pteenet ...``, which is also what ``torchrun -m pteenet ...`` runs on every rank."""
from .cli import main

if __name__ == "__main__":
    main()
