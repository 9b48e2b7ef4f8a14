"""Student samples (docs/method.md §8): multistep consistency sampling with the LoRA of a training run, for several
numbers of steps, from the teacher's noise; scored against the teacher's samples (docs/method.md §9).

    python test.py --output_dir runs/cm --train_data_dir results/teacher-ddim/train_gen_images/100_steps/9.0_gscale \
        --num_inference_steps 1 2 4 8

See ``python test.py --help`` and scripts/test.sh; the code is cmdistill/evaluation/.
"""

from cmdistill.evaluation.student import student_main

if __name__ == "__main__":
    student_main()
