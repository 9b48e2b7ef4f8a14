"""Consistency-model (CM) and Direct-CM distillation of SDXL into a LoRA student.

Re-implements and extends "Inconsistencies In Consistency Models: Better ODE Solving Does Not
Imply Better Samples" (Vouitsis et al., arXiv 2411.08954). The mathematics follows
``docs/method.md`` of the project; each module cites the section it implements.
"""

__version__ = "0.1.0"
