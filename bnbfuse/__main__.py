"""``python -m bnbfuse``: version, torch, which backends load, CPU ISA, CUDA archs, and
whether the CUDA kernels are registered (driver, runtime, devices; the kernels are loaded on
every GPU to check that an image exists for it); ``--bitsandbytes-names`` prints the table of
docs/bitsandbytes.md instead."""
import argparse

from . import backend_info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bnbfuse",
        description="Prints the bnbfuse and torch versions, which kernel backends loaded "
                    "(native CPU, native CUDA, pure-PyTorch reference), the CPU instruction "
                    "set in use, the CUDA architectures the library was built for and, "
                    "when its kernels are not registered, why (driver, runtime, devices).")
    parser.add_argument("--bitsandbytes-names", action="store_true",
                        help="print the markdown table of bitsandbytes 0.50's names and what "
                             "bnbfuse provides for each (docs/bitsandbytes.md)")
    if parser.parse_args(argv).bitsandbytes_names:
        from .compat import markdown_table

        print(markdown_table())
        return
    for key, value in backend_info(load_cuda_images=True).items():
        print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
