"""The toy world: the whole study (teacher, CM and Direct CM distillation, evaluation) offline on a CPU.

Generated from a seed, nothing downloaded:

- :mod:`.data` -- captioned images of one coloured shape on a plain background, in the LAION-11k
  layout (``metadata.csv`` with ``file_name,text``), with their attribute labels and a caption parser;
- :mod:`.teacher` -- an SDXL-architecture pipeline (text_time UNet, two CLIP text encoders with the
  real CLIP tokenizer, 8x AutoencoderKL, 1000-step scaled_linear schedule, epsilon prediction)
  trained on those images, loadable with :func:`cmdistill.models.load_teacher`;
- :mod:`.encoders` -- the toy metric networks (``fd_toy``, ``toy_caption_acc``), registered with
  :mod:`cmdistill.metrics` when imported;
- :mod:`.evaluate` -- the evidence that the teacher is trained;
- :mod:`.build` and ``python -m cmdistill.toy build --out toy/world --seed 0`` -- all of it, by stages.
"""
