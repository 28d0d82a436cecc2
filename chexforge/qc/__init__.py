"""Quality control during generation: rules on each image, the models they run, the retry seeds.

The runtime asks `QCRunner` about every generated image and regenerates a rejected one with
`attempt_seed`; recipe validation checks the rules' model files through `contracts.model_files`.
"""

from .rules import QCRunner, attempt_seed

__all__ = ["QCRunner", "attempt_seed"]
