"""Consistency-model (CM) distillation of SDXL into a LoRA student (docs/method.md §6). See README.md."""

from cmdistill.train import main

if __name__ == "__main__":
    main("cm")
