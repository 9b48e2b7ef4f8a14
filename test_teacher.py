"""Teacher reference samples (docs/method.md §8): deterministic ODE sampling of the SDXL teacher with classifier-free
guidance from the shared per-caption noise, scored against the real training images (docs/method.md §9).

    python test_teacher.py --train_data_dir data/preprocessed_11k/train --output_dir results/teacher-ddim \
        --scheduler ddim --num_original_inference_steps 100 --guidance_scale 9.0

See ``python test_teacher.py --help`` and scripts/test_teacher.sh; the code is cmdistill/evaluation/.
"""

from cmdistill.evaluation.teacher import teacher_main

if __name__ == "__main__":
    teacher_main()
