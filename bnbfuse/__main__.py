"""``python -m bnbfuse``: version, torch, which backends load, CPU ISA, CUDA archs."""
import argparse

from . import backend_info


def main(argv=None) -> None:
    argparse.ArgumentParser(
        prog="python -m bnbfuse",
        description="Prints the bnbfuse and torch versions, which kernel backends loaded "
                    "(native CPU, native CUDA, pure-PyTorch reference), the CPU instruction "
                    "set in use and the CUDA architectures the library was built for.").parse_args(argv)
    for key, value in backend_info().items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
