"""``python -m bnbfuse``: version, torch, which backends load, CPU ISA, CUDA archs."""
from . import backend_info


def main() -> None:
    for key, value in backend_info().items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
