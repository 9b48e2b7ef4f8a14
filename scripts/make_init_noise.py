"""Write the shared initial noise data/init_noise.pt (docs/method.md §8): ``[num_captions, 4, H/8, W/8]``, row i the
per-caption noise of caption i, so that runs with and without the file start from the same noise.

    python scripts/make_init_noise.py --train_data_dir data/preprocessed_11k/train --resolution 1024 --seed 24
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmdistill.evaluation.init_noise import init_noise_main  # noqa: E402

if __name__ == "__main__":
    init_noise_main()
