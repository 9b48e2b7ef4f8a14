"""The evaluation of docs/method.md §8-§9: teacher reference samples, student samples, their scores.

The programs (``test_teacher.py`` and ``test.py`` are thin entry points over them): ``teacher`` makes the
teacher's references, ``student`` evaluates a training run's weights (``weights`` picks them, ``references``
checks the teacher folder it is scored against), ``init_noise`` writes the shared noise file. Both programs
share ``flags`` (their common flags and checks) and ``driver`` (generate, score, record). Below them:
``inputs`` reads captions, initial noise and real images; ``store`` keeps generated samples resumably;
``generate`` loads the models and samples in batches sharded over processes; ``scoring`` computes the metrics
and logs them.
"""
