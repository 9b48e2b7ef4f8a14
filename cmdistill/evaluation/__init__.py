"""The evaluation of docs/method.md §8-§9: teacher reference samples, student samples, their scores.

``cli`` holds the two command-line programs (``test_teacher.py`` and ``test.py`` are thin entry
points over it) and the init-noise command; ``inputs`` reads captions, initial noise and real
images; ``store`` keeps generated samples resumably; ``generate`` loads the models and samples
in batches sharded over processes; ``scoring`` computes the metrics and logs them.
"""
