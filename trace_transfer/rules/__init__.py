"""Architecture rules: which tensor of a checkpoint plays which role (architecture knowledge as data).

``loader`` finds and loads rule files (``families/*.yaml``, registered dirs, ``$TRACE_TRANSFER_RULES_PATH``);
``schema`` parses and validates them; ``expr`` evaluates their config expressions; ``resolve`` matches a
rule set against a model's tensors; ``draft`` writes a first rule file for a new family.
"""

# The loader module's public names are the package's: one list, kept in loader.__all__.
from trace_transfer.rules.loader import *  # noqa: F403
from trace_transfer.rules.loader import __all__  # noqa: F401
