"""What the tests of ``miniinfer serve`` share: the served model's name and four prompts. The fixtures
built on them (``client``: the official ``openai`` client on a module's ``server``; ``offline``: the
same model's greedy answers, which a server must reproduce) live in ``conftest.py``."""

MODEL = "shakespeare"
PROMPTS = ["ROMEO.\n", "JULIET.\nO Romeo,", "HAMLET.\nTo be", "KING.\nWhat news"]
